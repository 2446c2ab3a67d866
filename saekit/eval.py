"""`EvalConfig` + `run(cfg)`: what each encoding's reconstruction does to the language model.

    store: whole held-out sequences (token ids) and their cached rows
      -> the store's model, clean, once per batch of sequences: logits and the hook's activations
      -> each encoding: cached rows -> reconstruction -> spliced in at the hook -> logits
      -> CE and KL(clean || spliced) per token; FVU, L0 and cossim on the same rows

Every encoding (the SAE's encoder, extra encoders, each pursuit method at each k, computed here or
read from a `saekit pursue` output) is measured on the same tokens against the same clean logits,
beside three baselines: the cached bf16 rows themselves ("cache round-trip": what the cache's
rounding alone costs), zeros ("zero ablation") and the store's mean row ("mean ablation").

The measurement itself (splicing, CE, KL, the clean run and the ablations, the conventions) and
its path on a store (sequences rebuilt from the store's token ids, the model loaded as the store
records it and checked against the cached rows) are `saekit.measure.downstream`, shared with `saekit
pursue --downstream`; this module chooses what to measure it on. By default the sequences are
the held-out ones (`saekit.measure.heldout`), never trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saekit.codes import encoder_sha256, group_name, open_codes_for
from saekit.config import check_k, check_non_negative, check_positive, need
from saekit.devices import dtype_name, resolve_device, resolve_dtype
from saekit.encodings import ENCODER, as_encoding, check_encoder_usable, encoder_k, raw_dictionary
from saekit.errors import SaekitError, is_non_empty, output_dir
from saekit.measure.downstream import (
    CLEAN,
    MEAN,
    ZERO,
    BatchEncoding,
    Downstream,
    SequenceLayout,
    codes_encoding,
    computed_encoding,
    sequence_layout,
    store_sequences,
)
from saekit.measure.gap import GapDecomposition, encoder_at_ks, encoder_at_label, gap_decompositions, gap_section
from saekit.measure.heldout import sae_held_out
from saekit.pursuit import ALL_METHODS, DEFAULT_REFINE, ENCODER_METHODS
from saekit.reports import STALE, Column, Plot, Report, encoder_label, fmt, markdown_table, stale_note
from saekit.sae import check_sae_fits_hook, load_sae
from saekit.store import open_store
from saekit.store.shard_cache import ShardCacheFields

ROUND_TRIP = "cache round-trip"
PLOT = "delta_ce_vs_l0.png"


# --------------------------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig(ShardCacheFields):
    """Everything `saekit eval` needs; each field is a CLI flag (`batch_size` -> `--batch-size`)."""

    store: str = ""
    """Activation store written by `saekit harvest`; its token ids are rerun through its model."""
    sae: str = ""
    """The SAE whose encoder (and dictionary, for the pursuits) is evaluated: a saekit run dir, a saekit SAE dir, a local sae-lens dir, or sae-lens RELEASE/ID."""
    out: str = ""
    """Output directory (report.json, report.md, delta_ce_vs_l0.png); must be new or empty."""
    encoders: list[str] = field(default_factory=list, metadata={"flag": "--encoder"})
    """Extra encoders compared on the same tokens (e.g. an MLP-encoder run dir), each loaded like --sae; repeat --encoder for several."""
    k: list[int] = field(default_factory=list)
    """Nonzeros per row for the pursuits (repeat --k): each method runs at each k against the SAE's dictionary."""
    methods: list[str] = field(default_factory=lambda: ["gp", "mp"], metadata={"flag": "--method"})
    """Pursuit methods run at each --k: gp, cgp, mp or omp (slow); and from the SAE's encoder: refit (its atoms, least-squares coefficients), encoder+gp (--refine steps of gp from its codes). Repeat --method for several; with gp, refit and encoder+gp the report splits the encoder's gap (docs/pursue.md)."""
    refine: int = DEFAULT_REFINE
    """Steps of gradient pursuit for --method encoder+gp, from the encoder's codes (0: the encoder's codes); as `saekit pursue --refine`."""
    codes: str = ""
    """A `saekit pursue` output: its codes are evaluated (not recomputed) for every (method, k) it holds; it must cover the evaluated rows."""
    hook: str | None = None
    """Hook to evaluate; default: the store's only hook."""
    sequences: int = 0
    """Evaluate the store's last N whole sequences; 0: the held-out ones (the rows `saekit train` holds out)."""
    tokens: int = 0
    """Evaluate the last whole sequences holding at least N of the store's rows; 0: see --sequences."""
    model: str = ""
    """Load this model (a transformer-lens name or a local checkpoint folder) instead of the one the store records, e.g. when its folder moved."""
    batch_size: int = 0
    """Sequences per forward pass; 0: as many as keep a batch's logits near 128 MiB (at most 64)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "fp32"
    """Model dtype: fp32 (a ΔCE of hundredths of a nat needs it), bf16, fp16, or auto (bf16 on a GPU)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --cache-dir, --cache-gb
        need(bool(self.store), "--store is required: the activation store to evaluate on")
        need(bool(self.sae), "--sae is required: a run dir, a saekit or sae-lens SAE dir, or RELEASE/ID")
        need(bool(self.out), "--out is required: the directory for the report")
        for k in self.k:
            check_positive("--k", k)
        need(len(set(self.k)) == len(self.k), f"--k values repeat ({', '.join(map(str, self.k))}): give each once")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        need(not unknown, f"unknown --method {unknown[0] if unknown else ''!r}: use one of {', '.join(ALL_METHODS)}")
        need(len(set(self.methods)) == len(self.methods), "--method values repeat: give each once")
        check_non_negative("--refine", self.refine, "encoder+gp is the encoder's codes")
        check_non_negative("--sequences", self.sequences, "the held-out sequences")
        check_non_negative("--tokens", self.tokens, "the held-out sequences")
        need(not (self.sequences and self.tokens), "pass --sequences or --tokens, not both")
        check_non_negative("--batch-size", self.batch_size, "auto")
        resolve_dtype(self.dtype, what="--dtype")  # an unknown --dtype is one line, now


class EvalEntry(NamedTuple):
    """One row of the report: one way of encoding (or a baseline), measured on the run's tokens."""

    method: str
    """'clean', a baseline, 'encoder' (the SAE's own), 'encoder:<name>', 'encoder@k<k>' (the SAE's
    encoder's top-k at a k other than its own), a pursuit method, 'refit' or 'encoder+gp' (these
    three marked ' (stale)' as the encoder row is)."""
    k: float | None
    """Pursuit k; an encoder's TopK k (Batch-TopK: its average); None otherwise."""
    source: str
    """The SAE, encoder or codes (OUT:group) this row used; the store for the cache round-trip; ''
    for the clean row and the ablations."""
    metrics: Downstream
    """CE, ΔCE, CE loss recovered, KL, FVU, L0, ... of this row (`saekit.measure.downstream.Downstream`)."""


class EvalResult(NamedTuple):
    """What `run` returns."""

    out: Path
    """The output directory."""
    entries: list[EvalEntry]
    """The report's rows (also in report.json)."""
    table: str
    """The report table (markdown, also in report.md)."""
    header: dict
    """What was evaluated: store, hook, model, sequences, tokens counted, positions spliced."""
    gaps: list[GapDecomposition]
    """The gap decomposition in FVU, ΔCE and KL mean at each k where the encoder, refit, encoder+gp
    and gp were all evaluated; empty otherwise (`saekit.measure.gap`)."""


# --------------------------------------------------------------------------------------------
# From the store: sequences, tokens, the model
# --------------------------------------------------------------------------------------------


def choose_sequences(cfg: EvalConfig, store: Any, layout: SequenceLayout, held_start: int, trained_here: bool) -> range:
    """The whole sequences to evaluate: the held-out ones (their rows start at `held_start`), or
    the store's last --sequences / enough for --tokens rows."""
    per = layout.per_seq
    whole = store.n_rows // per  # a last, partial sequence is never evaluated
    if cfg.sequences or cfg.tokens:
        want = cfg.sequences or -(-cfg.tokens // per)
        if want > whole:
            asked = (
                f"--sequences {want}" if cfg.sequences else f"--tokens {cfg.tokens} (= {want} sequences of {per} rows)"
            )
            raise SaekitError(
                f"{asked} is more than the store's {whole} whole sequences: pass at most {whole} sequences"
            )
        seqs = range(whole - want, whole)
        if trained_here and seqs.start * per < held_start:
            warnings.warn(
                f"rows {seqs.start * per}..{held_start - 1} of these sequences trained {cfg.sae}: its figures there are not held-out ones",
                stacklevel=2,
            )
        return seqs
    seqs = layout.within(range(held_start, store.n_rows))
    if not seqs:
        raise SaekitError(
            f"the store's held-out rows [{held_start}, {store.n_rows}) hold no whole sequence of {per} rows: "
            "pass --sequences N to evaluate the store's last N sequences"
        )
    return seqs


# --------------------------------------------------------------------------------------------
# What is compared
# --------------------------------------------------------------------------------------------


class _Row(NamedTuple):
    """A report row before it is measured."""

    method: str
    k: float | None
    source: str
    encoding: BatchEncoding | None  # None: the clean run and the ablations (evaluate adds them)


def _open_codes(cfg: EvalConfig, store: Any, hook: str, sae: Any) -> Any:
    """The --codes store, refused unless it was computed from this store, hook and dictionary."""
    if not cfg.codes:
        return None
    codes = open_codes_for(cfg.codes, f"codes in {cfg.codes}", store, hook, sae, f"--sae {cfg.sae}")
    a = codes.attrs
    if a.get("encoder_sha256") not in (None, encoder_sha256(sae)):
        raise SaekitError(
            f"codes in {cfg.codes} (refit, encoder+gp) started from another encoder than --sae {cfg.sae}'s: pass the SAE they were made with"
        )
    if a.get("refine") not in (None, cfg.refine) and "encoder+gp" in codes.methods.values():
        raise SaekitError(
            f"codes in {cfg.codes} hold encoder+gp made with --refine {a['refine']}, but this run has --refine {cfg.refine}: "
            f"pass --refine {a['refine']} to evaluate them"
        )
    return codes


def _code_rows(codes: Any, cfg: EvalConfig, rows: range) -> int:
    """The store row of the codes' first row, once the codes are known to hold every row of `rows`."""
    held = codes.rows()
    first = int(held[0]) if len(held) else 0
    consecutive = bool(torch.equal(held, torch.arange(first, first + len(held), dtype=held.dtype)))
    if not consecutive or rows.start < first or rows.stop > first + len(held):
        raise SaekitError(
            f"codes in {cfg.codes} cover store rows [{first}, {first + len(held)}) but the evaluation needs rows "
            f"[{rows.start}, {rows.stop}): run `saekit pursue` over those rows (its default: the held-out rows, all of them), or drop --codes to compute the pursuits here"
        )
    return first


def _pursuit_rows(cfg: EvalConfig, sae: Any, codes: Any, rows: range, per_seq: int, device: torch.device) -> list[_Row]:
    """Each method at each k, computed on the fly, and every (method, k) the --codes hold, read back;
    before them, with refit or encoder+gp, the encoder's top-k at each of their k but its own."""
    for k in cfg.k:
        check_k(k, sae.n_features, "--k", "the SAE's n_features")
    W, b = raw_dictionary(sae, device)
    stored = {(codes.methods[g], k): g for g, k in codes.groups.items()} if codes is not None else {}
    wanted = {(m, k) for m in cfg.methods for k in cfg.k} | set(stored)
    order = sorted(wanted, key=lambda mk: (ALL_METHODS.index(mk[0]), mk[1]))
    first = _code_rows(codes, cfg, rows) if stored else 0
    from_encoder = [(m, k) for m, k in order if m in ENCODER_METHODS]
    if any((m, k) not in stored for m, k in from_encoder):
        check_encoder_usable(sae, cfg.sae, f"--method {' and '.join(sorted({m for m, _ in from_encoder}))}")
    label = lambda name: encoder_label(name, sae, cfg.sae)  # noqa: E731
    out = []
    if from_encoder:
        for k in encoder_at_ks(sae, sorted({int(k) for _, k in from_encoder})):
            out.append(
                _Row(label(encoder_at_label(k)), k, cfg.sae, computed_encoding(sae, W, b, ENCODER, k, cfg.refine))
            )
    for method, k in order:
        g = stored.get((method, k))
        shown = label(method) if method in ENCODER_METHODS else method
        if g is None or codes is None:
            out.append(_Row(shown, k, cfg.sae, computed_encoding(sae, W, b, as_encoding(method), k, cfg.refine)))
        else:
            c = codes.codes(g, rows.start - first, rows.stop - first)
            out.append(_Row(shown, k, f"{cfg.codes}:{g}", codes_encoding(c, W, b, per_seq)))
    return out


def _rows(
    cfg: EvalConfig, store: Any, hook: str, sae: Any, seqs: range, per_seq: int, device: torch.device
) -> list[_Row]:
    """The report's rows in order: the clean run, the baselines, the encoder, extra encoders, pursuits."""
    rows = [
        _Row(CLEAN, None, "", None),
        _Row(ROUND_TRIP, None, cfg.store, lambda x, s: x),
        _Row(ZERO, None, "", None),
        _Row(MEAN, None, "", None),
        _Row(encoder_label("encoder", sae, cfg.sae), encoder_k(sae), cfg.sae, _own_output(sae, device)),
    ]
    for spec in cfg.encoders:
        enc = load_sae(spec, device)
        check_sae_fits_hook(enc, spec, store.d_model(hook), hook)
        name = f"encoder:{Path(spec).name or spec}"
        if name in {r.method for r in rows}:  # e.g. two runs' sae/ dirs: keep both
            name = f"encoder:{spec}#{len(rows)}"
        rows.append(_Row(encoder_label(name, enc, spec), encoder_k(enc), spec, _own_output(enc, device)))
    codes = _open_codes(cfg, store, hook, sae)
    rows += _pursuit_rows(cfg, sae, codes, range(seqs.start * per_seq, seqs.stop * per_seq), per_seq, device)
    return rows


def _own_output(sae: Any, device: torch.device) -> BatchEncoding:
    """An encoder's own output, decoded against its own dictionary."""
    return computed_encoding(sae, *raw_dictionary(sae, device), ENCODER, None, 0)


def _row_name(r: _Row) -> str:
    method = r.method.removesuffix(STALE)
    return group_name(method, int(r.k)) if method in ALL_METHODS and r.k is not None else r.method


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: EvalConfig) -> EvalResult:
    """Evaluate every encoding of `cfg` on the store's held-out sequences (or those asked for); write the report."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, what="--dtype")
    with output_dir(cfg.out, kept="nothing is written before the report", rerun="rerun the same command") as out:
        if is_non_empty(out):
            raise SaekitError(
                f"--out {out} already exists and is not empty: choose a new --out (eval never overwrites a report)"
            )
        return _run(cfg, out, device, dtype)


def _run(cfg: EvalConfig, out: Path, device: torch.device, dtype: torch.dtype) -> EvalResult:
    store = open_store(cfg.store, cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb)
    hook = store.resolve_hook(cfg.hook)
    layout = sequence_layout(store)
    sae = load_sae(cfg.sae, device)
    check_sae_fits_hook(sae, cfg.sae, store.d_model(hook), hook)
    held = sae_held_out(store, sae, cfg.sae)
    seqs = choose_sequences(cfg, store, layout, held.rows.start, held.trained_here)
    rows = _rows(cfg, store, hook, sae, seqs, layout.per_seq, device)
    sequences = store_sequences(store, hook, layout, seqs, device, dtype, model=cfg.model)
    encodings = {_row_name(r): r.encoding for r in rows if r.encoding is not None}
    results = sequences.evaluate(encodings, batch_size=cfg.batch_size, progress=cfg.progress)
    entries = [EvalEntry(r.method, r.k, r.source, results[_row_name(r)]) for r in rows]
    header = {
        "store": str(cfg.store),
        "hook": hook,
        "model": sequences.model.name,
        "sae": cfg.sae,
        "n_features": sae.n_features,
        **sequences.describe(),
        "held out": held.describe(layout.rows(seqs)),
        "tokens": results[CLEAN].n_tokens,
        "device": str(device),
        "dtype": dtype_name(dtype),
    }
    gaps = gap_decompositions(
        [(e.method, e.k, (e.metrics.fvu, e.metrics.delta_ce, e.metrics.kl_mean)) for e in entries],
        ("FVU", "ΔCE", "KL mean"),
    )
    table = write_report(out, entries, header, gaps)
    return EvalResult(out, entries, table, header, gaps)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def format_table(entries: list[EvalEntry]) -> str:
    """The entries as a markdown table."""
    m = lambda field, spec: Column(field[0], lambda e: fmt(getattr(e.metrics, field[1]), spec))  # noqa: E731
    columns = [
        Column("method", lambda e: e.method, "---"),
        Column("k", lambda e: fmt(e.k, "g")),
        m(("L0", "l0"), ".2f"),
        m(("FVU", "fvu"), ".4f"),
        m(("cossim", "cossim"), ".4f"),
        m(("CE", "ce"), ".4f"),
        m(("ΔCE", "delta_ce"), "+.4f"),
        m(("CE rec. (zero)", "ce_recovered_zero"), ".4f"),
        m(("CE rec. (mean)", "ce_recovered_mean"), ".4f"),
        m(("KL mean", "kl_mean"), ".4f"),
        m(("KL p90", "kl_p90"), ".4f"),
        m(("KL p99", "kl_p99"), ".4f"),
        m(("seconds", "seconds"), ".2f"),
    ]
    return markdown_table(columns, entries)


def entry_dict(e: EvalEntry) -> dict:
    """One report.json entry: method, k, source and every Downstream field (NaN as null)."""
    return {
        "method": e.method,
        "k": e.k,
        "source": e.source,
        **e.metrics.as_json(),
    }


def write_report(out: Path, entries: list[EvalEntry], header: dict, gaps: Sequence[GapDecomposition] = ()) -> str:
    """report.json (header, entries, gaps), report.md and delta_ce_vs_l0.png in `out`; returns the
    table (and the gap decomposition's)."""
    stale = stale_note([e.method for e in entries])
    about = (
        "CE and KL(clean ‖ spliced) are nats per counted token; CE recovered is "
        "(CE_ablation - CE) / (CE_ablation - CE_clean), a ratio of means. FVU, L0 and cossim are over the spliced "
        f"rows. See docs/eval.md.{' ' + stale if stale else ''}"
    )
    labels = ["ΔCE, nats per token (lower is better)", "KL(clean ‖ spliced), mean (lower is better)"]
    title = f"{Path(header['sae']).name} on {header['hook']}, {header['tokens']} tokens"
    report = Report(
        "eval",
        header,
        about,
        format_table(entries),
        doc={"header": header, "entries": [entry_dict(e) for e in entries], "gaps": [g.as_json() for g in gaps]},
        plot=Plot(PLOT, "ΔCE and KL against L0", labels, *downstream_series(entries), title=title),
        sections=[gap_section(gaps)] if gaps else [],
    )
    return report.write(out)


def downstream_series(entries: list[EvalEntry]) -> tuple[dict, dict, dict]:
    """What the report's plot draws: curves (a method over its k's: the pursuits, refit and
    encoder+gp), points (each encoder: the SAE's, encoder@k, extra encoders) and levels (the
    cache round-trip), each as label -> (L0, (ΔCE, KL mean))."""

    def ys(e: EvalEntry) -> tuple[float, float]:
        return e.metrics.delta_ce, e.metrics.kl_mean

    curves: dict[str, list] = {}
    points: dict[str, tuple] = {}
    for e in entries:
        if e.method.removesuffix(STALE) in ALL_METHODS:
            curves.setdefault(e.method, []).append((e.metrics.l0, ys(e)))
        elif e.method.startswith("encoder"):
            points[e.method] = (e.metrics.l0, ys(e))
    levels = {e.method: ys(e) for e in entries if e.method == ROUND_TRIP}
    return curves, points, levels

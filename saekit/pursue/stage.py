"""`PursueConfig` + `run(cfg)`: sparse codes for a whole activation cache, compared with the encoder.

    store rows [S, S + N) ──► SAE encoder (+ extra encoders) ──► metrics only
                          └─► pursuit method x k, against the SAE's dictionary ──► codes.zarr + metrics
    --downstream: the whole sequences inside those rows ──► each entry spliced into the model ──► ΔCE, KL

The rows are the SAE's held-out rows by default (`saekit.measure.heldout`: those `saekit train` held out,
never trained on), as quality figures must be: the first --rows of them, or all. --start-row S
compares N rows from any store row instead (--start-row 0: the store's first rows, as pursue did
before it had a default). The report's header says which rows, and whether they are held out.

Without --downstream the language model is never loaded: rows are read in store order, shard by
shard. Every entry of the report (the SAE's own encoder, each extra encoder, each pursuit method at
each k) is measured on exactly the same rows, with FVU against the mean of all of them
(`ReconstructionStats`). `--downstream` adds what `saekit eval` measures (`saekit.measure.downstream`, the
one implementation): each entry's reconstruction (a pursuit's from its stored codes) spliced into
the store's model on the whole sequences inside those rows (a last, partial sequence is left out).

Output directory:

    OUT/codes.zarr/               the codes store (`saekit.codes`): the store row of each code row and
                                  <method>_k<k>/{indices,values} per pursuit, in shards of the store's
                                  size counted from the first compared row
    OUT/report.json               list of entries: method, k, l0, fvu, explained_variance, ...
    OUT/report.md                 the same as a table
    OUT/fvu_vs_l0.png             FVU (and with --downstream ΔCE and KL) against L0: encoders as
                                  points, each method as a curve over k

Shards are written whole, each followed by its completion record (`saekit.store.shards`); a shard
without a valid record is recomputed on `--resume`, so a killed run continues where it stopped and
ends with the same bytes. Codes use the raw-space dictionary (`Decoder.raw_dictionary`), so they
are in the SAE's own units: `sae.decode(to_dense(codes, n))` reconstructs raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from saekit.codes import (
    CODES_DIR,
    CODES_FORMAT,
    ROWS,
    CodesStore,
    dictionary_sha256,
    encoder_sha256,
    group_name,
    read_codes_attrs,
)
from saekit.config import check_k, check_non_negative, check_positive, need
from saekit.devices import device_clock, resolve_device
from saekit.encodings import ENCODER, as_encoding, check_encoder_usable, encode, encoder_k, raw_dictionary
from saekit.errors import SaekitError, is_non_empty, output_dir
from saekit.measure.downstream import (
    CLEAN,
    MEAN,
    ZERO,
    Downstream,
    StoreSequences,
    codes_encoding,
    computed_encoding,
    sequence_layout,
    store_sequences,
)
from saekit.measure.gap import encoder_at_ks, encoder_at_label
from saekit.measure.heldout import HeldOut, sae_held_out
from saekit.measure.recovery import DictionaryRecovery, Recovery, RecoveryStats, TruthRows
from saekit.metrics import ReconstructionMetrics, ReconstructionStats
from saekit.pursue.report import Entry, PursueResult, entry_gaps, write_report
from saekit.pursuit import (
    ALL_METHODS,
    DEFAULT_REFINE,
    ENCODER_METHODS,
    SparseCodes,
    reconstruct,
)
from saekit.reports import encoder_label
from saekit.sae import check_sae_fits_hook, load_sae
from saekit.store import open_store
from saekit.store.shard_cache import ShardCacheFields
from saekit.store.shards import discard_unfinished_creation

# What decides the codes' bytes; --resume refuses to mix runs that differ in any of them. The
# store and the SAE are identified by content (so either may move; the SAE's encoder only when
# refit or encoder+gp start from it), and extra encoders, batch size and device change only the
# report, so they may differ on resume.
CODES_IDENTITY = (
    "store_hash",
    "hook",
    "dictionary_sha256",
    "methods",
    "k",
    "start_row",
    "rows",
    "encoder_sha256",
    "refine",
)
# What codes from before an identity key existed had (they started from no encoder).
IDENTITY_BEFORE = {"start_row": 0, "encoder_sha256": None, "refine": None}
# What to do when --downstream cannot load or use the store's model (pursue has no --model).
EVAL_INSTEAD = "drop --downstream here, and measure CE and KL with `saekit eval --model MODEL`"


# --------------------------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------------------------


@dataclass
class PursueConfig(ShardCacheFields):
    """Everything `saekit pursue` needs; each field is a CLI flag (`batch_size` -> `--batch-size`)."""

    store: str = ""
    """Activation store written by `saekit harvest`."""
    sae: str = ""
    """The dictionary (and encoder): a saekit run dir (its sae/), a saekit SAE dir, a local sae-lens dir, or sae-lens RELEASE/ID."""
    out: str = ""
    """Output directory (codes.zarr, report.json, report.md, fvu_vs_l0.png). Must not exist unless --resume."""
    k: list[int] = field(default_factory=list)
    """Nonzeros per row for each pursuit; repeat --k to trace FVU against L0 (e.g. --k 16 --k 32)."""
    methods: list[str] = field(default_factory=lambda: ["gp", "mp"], metadata={"flag": "--method"})
    """Pursuit methods: gp (gradient), cgp (conjugate gradient), mp (matching), omp (orthogonal, slow); and from the SAE's encoder at each k: refit (its atoms, least-squares coefficients), encoder+gp (--refine steps of gp from its codes). Repeat --method for several; with gp, refit and encoder+gp the report splits the encoder's gap (docs/pursue.md)."""
    refine: int = DEFAULT_REFINE
    """Steps of gradient pursuit for --method encoder+gp, from the encoder's codes (0: the encoder's codes). Default 3: each step costs one encoder-sized matmul, far fewer than gp's k, and on the demo SAE (k 8, 16, 32) 3 steps do 77-93% of what 10 do (docs/pursue.md)."""
    hook: str | None = None
    """Hook to read; default: the store's only hook."""
    rows: int = 0
    """How many rows to compare; 0: all the held-out rows (with --start-row: every row from there on)."""
    start_row: int | None = None
    """First store row compared; default: the first held-out row (the rows after those the SAE's own record says trained it on this store, else the store's last min(65536, rows/10)). --start-row 0 compares the store's first rows, which an SAE trained on this store has seen."""
    encoders: list[str] = field(default_factory=list, metadata={"flag": "--encoder"})
    """Extra encoders to compare on the same rows (e.g. an MLP-encoder run dir), each loaded like --sae; repeat --encoder for several."""
    downstream: bool = False
    """Also splice each entry's reconstruction into the store's model, as `saekit eval` does: ΔCE, CE loss recovered and KL on the whole sequences inside the rows."""
    batch_size: int = 2048
    """Rows per pursuit/encoder batch (the pursuit further chunks rows to bound memory)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."""
    resume: bool = False
    """Continue an interrupted run in --out (finished shards are kept; the report is rebuilt)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --cache-dir, --cache-gb
        need(bool(self.store), "--store is required: the activation store to read")
        need(bool(self.sae), "--sae is required: a run dir, a saekit or sae-lens SAE dir, or RELEASE/ID")
        need(bool(self.out), "--out is required: the directory for codes and the report")
        need(bool(self.k), "--k is required: nonzeros per row for the pursuit (repeat --k for several)")
        for k in self.k:
            check_positive("--k", k)
        need(len(set(self.k)) == len(self.k), f"--k values repeat ({', '.join(map(str, self.k))}): give each once")
        need(bool(self.methods), f"--method is required: one or more of {', '.join(ALL_METHODS)}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        need(not unknown, f"unknown --method {unknown[0] if unknown else ''!r}: use one of {', '.join(ALL_METHODS)}")
        need(len(set(self.methods)) == len(self.methods), "--method values repeat: give each once")
        check_non_negative("--refine", self.refine, "encoder+gp is the encoder's codes")
        check_non_negative("--rows", self.rows, "all the held-out rows")
        if self.start_row is not None:
            need(self.start_row >= 0, f"--start-row {self.start_row} must be >= 0 (leave it out: the held-out rows)")
        check_positive("--batch-size", self.batch_size)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_out(cfg: PursueConfig) -> Path:
    out = Path(cfg.out)
    if cfg.resume:
        # a creation of codes.zarr cut off before its attributes (e.g. a full disk) holds no codes;
        # codes.zarr is saekit's own directory inside --out, so it goes and is made again.
        discard_unfinished_creation(out / CODES_DIR, CODES_FORMAT, own_entries=None)
    if is_non_empty(out):
        if not cfg.resume:
            raise SaekitError(f"output {out} already exists: pass --resume to continue it, or choose a new --out")
        if read_codes_attrs(out / CODES_DIR) is None:
            meta = out / CODES_DIR / "zarr.json"
            if meta.is_file():  # its codes are there: say what is wrong, not "no codes.zarr"
                raise SaekitError(
                    f"--resume: {meta} is damaged or not written by `saekit pursue`; restore it from a copy, or choose a new --out"
                )
            raise SaekitError(f"--resume: {out} is not a `saekit pursue` output (no {CODES_DIR}); choose a new --out")
    return out


def _open_or_create(out: Path, identity: dict, groups: dict[str, dict], n_rows: int, layout: Any) -> CodesStore:
    root = out / CODES_DIR
    attrs = read_codes_attrs(root)
    if attrs is None:
        return CodesStore.create(
            root,
            identity=identity,
            groups=groups,
            n_rows=n_rows,
            shard_rows=layout.shard_rows,
            chunk_rows=layout.chunk_rows,
        )
    saved = IDENTITY_BEFORE | attrs  # e.g. codes from before --start-row start at the store's first row
    diff = [k for k in CODES_IDENTITY if saved.get(k) != identity[k]]
    if attrs.get("shard_rows") != layout.shard_rows:
        diff.append("the store's shard layout")
    if diff:
        raise SaekitError(
            f"--resume: {out} was started with different settings (differs in: {', '.join(diff)}); use the same ones or a new --out"
        )
    return CodesStore(root, attrs)


def run(cfg: PursueConfig) -> PursueResult:
    """Encode and pursue the store's held-out rows (or the rows `cfg` asks for); write codes and the report."""
    device = resolve_device(cfg.device)
    with output_dir(cfg.out, kept="finished code shards are kept"):
        return _run(cfg, device)


def _run(cfg: PursueConfig, device: torch.device) -> PursueResult:
    out = _check_out(cfg)
    store = open_store(cfg.store, cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb)
    hook = store.resolve_hook(cfg.hook)
    d_model = store.d_model(hook)
    sae = load_sae(cfg.sae, device)
    check_sae_fits_hook(sae, cfg.sae, d_model, hook)
    held = sae_held_out(store, sae, cfg.sae)
    rows = compared_rows(cfg, store.n_rows, held)
    for k in cfg.k:
        check_k(k, sae.n_features, "--k", "the SAE's n_features")
    from_encoder = [m for m in cfg.methods if m in ENCODER_METHODS]
    if from_encoder:
        check_encoder_usable(sae, cfg.sae, f"--method {' and '.join(from_encoder)}")
    extras = []
    for spec in cfg.encoders:
        enc = load_sae(spec, device)
        check_sae_fits_hook(enc, spec, d_model, hook)
        name = f"encoder:{Path(spec).name or spec}"
        if name in {"encoder", *(e[0] for e in extras)}:  # e.g. two runs' sae/ dirs: keep both
            name = f"encoder:{spec}#{len(extras) + 1}"
        extras.append((name, spec, enc))
    # before anything is written: a store without sequences or a model that won't load is one line
    sequences = _downstream_sequences(store, hook, rows, device) if cfg.downstream else None

    identity = {
        "store": str(cfg.store),
        "store_hash": store.content_hash,
        "hook": hook,
        "sae": cfg.sae,
        "dictionary_sha256": dictionary_sha256(sae),
        "methods": cfg.methods,
        "k": sorted(cfg.k),
        "start_row": rows.start,
        "rows": len(rows),
        "encoder_sha256": encoder_sha256(sae) if from_encoder else None,
        "refine": cfg.refine if "encoder+gp" in cfg.methods else None,
    }
    groups = {group_name(m, k): {"method": m, "k": k} for m in cfg.methods for k in sorted(cfg.k)}
    at_k = encoder_at_ks(sae, cfg.k) if from_encoder else []
    out.mkdir(parents=True, exist_ok=True)
    codes = _open_or_create(out, identity, groups, len(rows), store.layout)

    W, b = raw_dictionary(sae, device)
    stats = _Pass(cfg, store, hook, codes, sae, extras, at_k, W, b, device).measure()
    codes.finalize()
    spliced = _downstream(cfg, sequences, sae, extras, at_k, codes, W, b) if sequences is not None else {}

    entries = [
        _entry(encoder_label(name, enc, spec), encoder_k(enc), stats[name], None, spec, spliced.get(name))
        for name, spec, enc in [("encoder", cfg.sae, sae), *extras]
    ]
    for k in at_k:
        name = encoder_at_label(k)
        entries.append(_entry(encoder_label(name, sae, cfg.sae), k, stats[name], None, cfg.sae, spliced.get(name)))
    for g, spec in groups.items():
        m = stats[g]._replace(seconds=codes.seconds(g))
        method = encoder_label(spec["method"], sae, cfg.sae) if spec["method"] in ENCODER_METHODS else spec["method"]
        entries.append(_entry(method, spec["k"], m, f"{CODES_DIR}/{g}", cfg.sae, spliced.get(g)))
    header = {
        "store": str(cfg.store),
        "hook": hook,
        "rows": len(rows),
        "store rows": f"{rows.start}..{rows.stop - 1}",
        "held out": held.describe(rows),
        "sae": cfg.sae,
        "n_features": sae.n_features,
        "device": str(device),
    }
    if sequences is not None:
        header |= _downstream_header(sequences, spliced)
    gaps = entry_gaps(entries)
    table = write_report(out, entries, header, gaps)
    return PursueResult(out, entries, table, header, gaps)


def compared_rows(cfg: PursueConfig, n_rows: int, held: HeldOut) -> range:
    """The store rows pursue compares: the first --rows of the held-out rows (all of them by
    default), or --rows from --start-row (every row from there by default)."""
    if cfg.start_row is None:
        n_held = len(held.rows)
        if not n_held:
            raise SaekitError(
                f"the store's {n_rows} rows are too few to hold any out (a tenth of them, rounded down, is 0): "
                "pass --start-row 0 to compare its rows"
            )
        if cfg.rows > n_held:
            raise SaekitError(
                f"--rows {cfg.rows} is more than the store's {n_held} held-out rows ({held.rows.start}..{n_rows - 1}): "
                f"pass at most {n_held}, or --start-row to compare rows that are not held out"
            )
        return range(held.rows.start, held.rows.start + (cfg.rows or n_held))
    if cfg.start_row >= n_rows:
        raise SaekitError(
            f"--start-row {cfg.start_row} is past the store's last row ({n_rows - 1}): pass a smaller one"
        )
    if cfg.start_row + cfg.rows > n_rows:
        raise SaekitError(
            f"--rows {cfg.rows} from --start-row {cfg.start_row} runs past the store's {n_rows} rows: "
            f"pass at most {n_rows - cfg.start_row} (0: every row from there)"
        )
    return range(cfg.start_row, cfg.start_row + cfg.rows if cfg.rows else n_rows)


def _downstream_sequences(store: Any, hook: str, rows: range, device: torch.device) -> StoreSequences:
    """The whole sequences inside the compared rows, with the store's model, loaded and checked."""
    layout = sequence_layout(store)
    seqs = layout.within(rows)
    if not seqs:
        raise SaekitError(
            f"--downstream: the compared rows [{rows.start}, {rows.stop}) hold no whole sequence of the store "
            f"({layout.per_seq} rows each, from row 0 on): compare more rows (--rows), or from a sequence's first row"
        )
    # fp32, as saekit eval's default: a ΔCE of hundredths of a nat needs it
    return store_sequences(store, hook, layout, seqs, device, torch.float32, fix=EVAL_INSTEAD)


def _downstream(
    cfg: PursueConfig,
    sequences: StoreSequences,
    sae: Any,
    extras: list,
    at_k: list[int],
    codes: CodesStore,
    W: torch.Tensor,
    b: torch.Tensor,
) -> dict[str, Downstream]:
    """Every entry spliced into the model on `sequences`; the pursuits from their stored codes, so a
    resumed run reports what an uninterrupted one does. Returns entry name (group for pursuits) -> metrics."""
    rows, per = sequences.layout.rows(sequences.seqs), sequences.layout.per_seq
    first, last = (
        rows.start - codes.start_row,
        rows.stop - codes.start_row,
    )  # code rows count from the first compared row
    device = W.device
    encodings = {"encoder": computed_encoding(sae, W, b, ENCODER, None, 0)}
    encodings |= {
        name: computed_encoding(enc, *raw_dictionary(enc, device), ENCODER, None, 0) for name, _, enc in extras
    }
    encodings |= {encoder_at_label(k): computed_encoding(sae, W, b, ENCODER, k, 0) for k in at_k}
    encodings |= {g: codes_encoding(codes.codes(g, first, last), W, b, per) for g in codes.groups}
    return sequences.evaluate(encodings, progress=cfg.progress)


def _downstream_header(sequences: StoreSequences, spliced: dict[str, Downstream]) -> dict:
    """The report header's lines for --downstream: which tokens, and the baselines' CE."""
    described = {f"downstream {k}": v for k, v in sequences.describe().items()}
    return {
        "downstream model": f"{sequences.model.name} (fp32)",
        **described,
        "downstream tokens": spliced[CLEAN].n_tokens,
        **{f"{name} CE": spliced[name].ce for name in (CLEAN, ZERO, MEAN)},
    }


class _Measured(NamedTuple):
    metrics: ReconstructionMetrics
    seconds: float
    recovery: Recovery | None = None


@dataclass
class _Pass:
    """The one pass over the compared rows, shard by shard: encoders measured, pursuits run (or
    their finished shards read back) and measured (`run` builds it; `measure` runs it)."""

    cfg: PursueConfig
    store: Any
    hook: str
    codes: CodesStore
    sae: Any
    extras: list
    at_k: list[int]
    W: torch.Tensor
    b: torch.Tensor
    device: torch.device

    def __post_init__(self) -> None:
        self.encoders = [("encoder", self.sae), *[(name, enc) for name, _, enc in self.extras]]
        self.dictionaries = {
            name: (self.W, self.b) if enc is self.sae else raw_dictionary(enc, self.device)
            for name, enc in self.encoders
        }
        names = [*(n for n, _ in self.encoders), *map(encoder_at_label, self.at_k), *self.codes.groups]
        self.stats = {name: ReconstructionStats() for name in names}
        self.seconds = dict.fromkeys(self.stats, 0.0)
        # on a store with ground truth: each entry's codes against the true ones, through its dictionary
        self.recovery: dict[str, tuple[RecoveryStats, DictionaryRecovery]] = {}
        if self.store.has_truth:
            truth = TruthRows(self.store.truth_features()["features"])
            for name in self.stats:
                W = self.dictionaries[name][0] if name in self.dictionaries else self.W
                matching, found = truth.of(W)
                self.recovery[name] = (RecoveryStats(matching), found)
        # the ks whose encoder codes some row needs: an encoder@k row, or a refit / encoder+gp group
        groups = self.codes.groups
        self.start_ks = sorted(
            {*self.at_k, *(k for g, k in groups.items() if self.codes.methods[g] in ENCODER_METHODS)}
        )

    def measure(self) -> dict[str, _Measured]:
        """Returns name -> metrics over all rows."""
        codes = self.codes
        bar = tqdm(
            total=codes.n_rows,
            unit="row",
            unit_scale=True,
            desc="pursue",
            disable=not self.cfg.progress,
            dynamic_ncols=True,
        )
        try:
            for i in range(codes.n_shards):
                self._shard(i, bar)
        finally:
            bar.close()
        found = {name: Recovery.of(d, r.compute()) for name, (r, d) in self.recovery.items()}
        return {name: _Measured(s.compute(), self.seconds[name], found.get(name)) for name, s in self.stats.items()}

    def _shard(self, i: int, bar: Any) -> None:
        """Shard i of the codes: its missing groups computed and written, every entry measured."""
        codes = self.codes
        start, stop = codes.shard_range(i)
        row0 = codes.start_row  # code row j is store row row0 + j
        if codes.record(ROWS, i) is None:
            codes.write(ROWS, i, {ROWS: np.arange(row0 + start, row0 + stop, dtype=np.int64)}, 0.0)
        done = {g: codes.read(g, i) for g in codes.groups}
        todo = [g for g, v in done.items() if v is None]
        fresh = {g: _empty_shard(g, stop - start, codes.groups[g]) for g in todo}
        spent = dict.fromkeys(todo, 0.0)
        x_shard = self.store.rows(self.hook, row0 + start, row0 + stop)
        truth = self.store.truth_codes(row0 + start, row0 + stop) if self.recovery else None
        for b0 in range(0, stop - start, self.cfg.batch_size):
            b1 = min(b0 + self.cfg.batch_size, stop - start)
            x = x_shard[b0:b1].to(self.device).float()
            t = SparseCodes(truth[0][b0:b1].to(self.device), truth[1][b0:b1].to(self.device)) if truth else None
            self._batch(x, slice(b0, b1), {**done, **fresh}, fresh, spent, t)
            bar.update(b1 - b0)
        for g in todo:
            codes.write(g, i, fresh[g], spent[g])

    def _recover(self, name: str, codes: SparseCodes, truth: SparseCodes | None) -> None:
        if truth is not None:
            self.recovery[name][0].update(codes, truth)

    def _batch(
        self,
        x: torch.Tensor,
        rows: slice,
        arrays: dict,
        fresh: dict,
        spent: dict[str, float],
        truth: SparseCodes | None,
    ) -> None:
        """Rows `rows` of the shard (x [b, d] on the device): each encoder, each encoder@k, and each
        group, computed into `fresh` where the shard has none yet, then measured from `arrays`."""
        device, W, b = self.device, self.W, self.b
        with torch.no_grad():
            for name, enc in self.encoders:
                t0 = device_clock(device)
                c = encode(x, ENCODER, None, enc)
                x_hat = reconstruct(c, *self.dictionaries[name])
                self.seconds[name] += device_clock(device) - t0
                self.stats[name].update(x, x_hat, c.values)
                self._recover(name, c, truth)
        starts, start_seconds = _encoder_starts(self.sae, x, self.start_ks, device)
        for k in self.at_k:
            name = encoder_at_label(k)
            self.seconds[name] += start_seconds[k]
            self.stats[name].update(x, reconstruct(starts[k], W, b), starts[k].values)
            self._recover(name, starts[k], truth)
        for g, k in self.codes.groups.items():
            if g in fresh:
                method = as_encoding(self.codes.methods[g])
                start = starts[k] if method in ENCODER_METHODS else None
                if start is not None:  # its time includes the encoder's
                    spent[g] += start_seconds[k]
                t0 = device_clock(device)
                c = encode(x, method, k, self.sae, (W, b), refine=self.cfg.refine, start=start)
                spent[g] += device_clock(device) - t0
                fresh[g][f"{g}/indices"][rows] = c.indices.to("cpu", torch.int32).numpy()
                fresh[g][f"{g}/values"][rows] = c.values.cpu().numpy()
            # Metrics always come from the stored form of the codes, so a resumed run reports
            # exactly what an uninterrupted one does.
            c = SparseCodes(
                torch.from_numpy(arrays[g][f"{g}/indices"][rows]).long().to(device),
                torch.from_numpy(arrays[g][f"{g}/values"][rows]).to(device),
            )
            self.stats[g].update(x, reconstruct(c, W, b), c.values)
            self._recover(g, c, truth)


def _encoder_starts(
    sae: Any, x: torch.Tensor, ks: list[int], device: torch.device
) -> tuple[dict[int, SparseCodes], dict[int, float]]:
    """The encoder's codes of x at each k (`encoder_codes`), and the seconds each took."""
    starts, seconds = {}, {}
    for k in ks:
        t0 = device_clock(device)
        starts[k] = encode(x, ENCODER, k, sae)
        seconds[k] = device_clock(device) - t0
    return starts, seconds


def _empty_shard(group: str, n: int, k: int) -> dict[str, np.ndarray]:
    return {f"{group}/indices": np.zeros((n, k), np.int32), f"{group}/values": np.zeros((n, k), np.float32)}


def _entry(
    method: str, k: float | None, m: _Measured, codes: str | None, source: str, downstream: Downstream | None
) -> Entry:
    r = m.metrics
    return Entry(
        method,
        k,
        r.l0,
        r.fvu,
        r.explained_variance,
        r.mse,
        r.cossim,
        r.l2_ratio,
        m.seconds,
        r.n_tokens,
        codes,
        source,
        downstream,
        m.recovery,
    )

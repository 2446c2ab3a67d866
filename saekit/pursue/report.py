"""`saekit pursue`'s report: its entries (`Entry`), what `run` returns (`PursueResult`), the table,
report.json, report.md and the plot against L0 (written by `saekit.reports.Report`), with the gap
decomposition and, on a store with ground truth, the recovery section."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from saekit.measure.downstream import Downstream
from saekit.measure.gap import GapDecomposition, gap_decompositions, gap_section
from saekit.measure.recovery import Recovery, recovery_section
from saekit.reports import Column, Plot, Report, markdown_table, stale_note

PLOT = "fvu_vs_l0.png"


class Entry(NamedTuple):
    """One line of the report: one way of encoding, measured on the run's rows."""

    method: str
    """'encoder' (the SAE's own), 'encoder:<name>' (an extra encoder), 'encoder@k<k>' (the SAE's
    encoder's top-k at a --k other than its own), a pursuit method, 'refit' or 'encoder+gp'. An
    encoder not trained with its dictionary is marked ' (stale)' (`saekit.reports.encoder_stale`), and
    so are the rows that start from it."""
    k: float | None
    """Pursuit k; an encoder's TopK k (Batch-TopK: its average); None for ReLU/JumpReLU encoders."""
    l0: float
    """Mean nonzero codes per row."""
    fvu: float
    """Fraction of variance unexplained, against the mean of all evaluated rows."""
    explained_variance: float
    """1 - fvu."""
    mse: float
    """Mean over rows of ||x - x_hat||^2 (raw activation space)."""
    cossim: float
    """Mean cosine similarity of each row and its reconstruction."""
    l2_ratio: float
    """Mean ||x_hat|| / ||x||."""
    seconds: float
    """Time spent computing the codes (pursuit or encoder forward), summed over shards."""
    n_rows: int
    """Rows evaluated."""
    codes: str | None
    """Group in codes.zarr holding the codes (pursuit entries), else None."""
    source: str
    """The SAE or encoder this entry used (as given on the command line)."""
    downstream: Downstream | None = None
    """With --downstream: CE, ΔCE, CE loss recovered, KL, ... on the whole sequences inside the rows
    (`saekit.measure.downstream.Downstream`, what `saekit eval` reports); else None."""
    recovery: Recovery | None = None
    """On a store with ground truth (a synthetic one): the dictionary's MCC, uniqueness and share of
    true features found, and the codes' support precision, recall and F1, magnitude correlation and
    shrinkage (`saekit.measure.recovery`); else None."""


class PursueResult(NamedTuple):
    """What `run` returns."""

    out: Path
    """The output directory."""
    entries: list[Entry]
    """The report's entries (also in report.json)."""
    table: str
    """The report table (markdown, also in report.md)."""
    header: dict
    """What was compared: store, hook, rows (how many, which, whether held out), SAE; with --downstream
    the sequences, tokens and baselines."""
    gaps: list[GapDecomposition]
    """The gap decomposition at each k where the encoder, refit, encoder+gp and gp were all run
    (FVU; with --downstream also ΔCE and KL mean); empty otherwise (`saekit.measure.gap`)."""


def entry_gaps(entries: Sequence[Entry]) -> list[GapDecomposition]:
    """The gap decompositions the entries hold: FVU, and with --downstream ΔCE and KL mean."""
    downs = [d for e in entries if (d := e.downstream) is not None]
    if entries and len(downs) == len(entries):
        rows = [(e.method, e.k, (e.fvu, d.delta_ce, d.kl_mean)) for e, d in zip(entries, downs)]
        return gap_decompositions(rows, ("FVU", "ΔCE", "KL mean"))
    return gap_decompositions([(e.method, e.k, (e.fvu,)) for e in entries], ("FVU",))


def format_table(entries: Sequence[Entry]) -> str:
    """The entries as a markdown table (with --downstream: ΔCE, CE loss recovered against zeros, KL mean)."""
    columns = [
        Column("method", lambda e: e.method, "---"),
        Column("k", lambda e: "" if e.k is None else f"{e.k:g}"),
        Column("L0", lambda e: f"{e.l0:.2f}"),
        Column("FVU", lambda e: f"{e.fvu:.4f}"),
        Column("explained variance", lambda e: f"{e.explained_variance:.4f}"),
        Column("MSE", lambda e: f"{e.mse:#.4g}"),
        Column("cossim", lambda e: f"{e.cossim:.4f}"),
    ]
    if all(e.downstream is not None for e in entries):
        columns += [
            Column("ΔCE", lambda e: f"{e.downstream.delta_ce:+.4f}"),
            Column("CE rec. (zero)", lambda e: f"{e.downstream.ce_recovered_zero:.4f}"),
            Column("KL mean", lambda e: f"{e.downstream.kl_mean:.4f}"),
        ]
    columns += [
        Column("seconds", lambda e: f"{e.seconds:.2f}"),
        Column("rows/s", lambda e: f"{e.n_rows / e.seconds:,.0f}" if e.seconds > 0 else ""),
    ]
    return markdown_table(columns, entries)


def entry_dict(e: Entry, gaps: Sequence[GapDecomposition] = ()) -> dict:
    """One report.json entry: every Entry field, `downstream` as a dict of every Downstream field (or
    null), and `gap`: on gp's entry at a k with a gap decomposition, its decompositions (one per
    metric, every GapDecomposition field), else null."""
    mine = [g.as_json() for g in gaps if e.method == "gp" and e.k == g.k]
    downstream = e.downstream.as_json() if e.downstream is not None else None
    recovery = e.recovery.as_json() if e.recovery is not None else None
    return {**e._asdict(), "downstream": downstream, "recovery": recovery, "gap": mine or None}


def write_report(out: Path, entries: Sequence[Entry], header: dict, gaps: Sequence[GapDecomposition] = ()) -> str:
    """report.json, report.md and fvu_vs_l0.png in `out`; returns the table (and the gap decomposition's)."""
    about = f"FVU is against the mean of all {header['rows']} rows."
    stale = stale_note([e.method for e in entries])
    about += f" {stale}" if stale else ""
    if "downstream tokens" in header:
        about += (
            " ΔCE, CE rec. (zero) and KL mean are `saekit eval`'s (KL(clean ‖ spliced), nats per counted token), "
            "on the whole sequences inside the rows. See docs/eval.md."
        )
    held = "held-out " if header["held out"].startswith("yes") else ""
    title = f"{Path(header['sae']).name} on {header['hook']}, {held}rows {header['store rows']}"
    if "downstream tokens" in header:
        title += f" (ΔCE and KL: {header['downstream tokens']:,} tokens of their whole sequences)"
    report = Report(
        "pursue",
        header,
        about,
        format_table(entries),
        doc=[entry_dict(e, gaps) for e in entries],
        plot=fvu_vs_l0_plot(entries, title),
        sections=[gap_section(gaps)] if gaps else [],
    )
    if entries and all(e.recovery is not None for e in entries):
        report.sections.append(recovery_section([(e.method, e.k, e.fvu, e.recovery) for e in entries if e.recovery]))
    return report.write(out)


def fvu_vs_l0_plot(entries: Sequence[Entry], title: str = "") -> Plot:
    """FVU (with --downstream also ΔCE and mean KL) against L0: each encoder a labelled point, each
    pursuit method a curve over k."""
    labels = ["FVU (lower is better)"]
    ys = lambda e: (e.fvu,)
    if all(e.downstream is not None for e in entries):
        labels += ["ΔCE, nats per token (lower is better)", "KL(clean ‖ spliced), mean (lower is better)"]
        ys = lambda e: (e.fvu, e.downstream.delta_ce, e.downstream.kl_mean)
    if entries and all(e.recovery is not None for e in entries):
        labels += ["support F1 vs the truth (higher is better)"]
        ys = lambda e, before=ys: (*before(e), e.recovery.f1)
    curves: dict[str, list] = {}
    for e in entries:
        if e.codes is not None:
            curves.setdefault(e.method, []).append((e.l0, ys(e)))
    points = {e.method: (e.l0, ys(e)) for e in entries if e.codes is None}
    return Plot(PLOT, "FVU against L0", labels, curves, points, title=title)

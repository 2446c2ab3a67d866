"""The amortisation gap at each k, split into wrong coefficients and wrong support.

An SAE's encoder reconstructs worse than gradient pursuit against its own dictionary at the same
k. Two encodings between them say why (`saekit.pursuit.refit` and `refine`):

    encoder ──(coefficients)──► refit ──(support)──► gp
    (its codes)   same atoms, optimal       the atoms pursuit picks
                  nonnegative coefficients

    coefficients share = (encoder - refit) / (encoder - gp)
    support share      = (refit - gp) / (encoder - gp)

for a metric where lower is better (FVU, ΔCE, KL). The two shares add up to 1; a support share
above 1 (refit below gp) means the encoder's atoms, refit, beat gp's. `encoder+gp` (gradient
pursuit warm-started from the encoder's codes, `--refine` steps) shows how much of the support
gap a few pursuit steps close. The encoder here is the encoder's top-k at that k
(`encoder_at_label`: `encoder@k8`) unless k is a TopK encoder's own k, so every row of a
decomposition has the same number of atoms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from saekit.reports import STALE

# The four rows of a decomposition, in order.
ROLES = ("encoder", "refit", "encoder+gp", "gp")
_AT = "encoder@k"


class GapDecomposition(NamedTuple):
    """The encoder -> gp gap of one metric at one k, and how it splits (lower is better)."""

    k: int
    """Nonzeros per row, the same in all four rows."""
    metric: str
    """'FVU', 'ΔCE' or 'KL mean'."""
    encoder: float
    """The encoder's codes at k (its own TopK codes, else its top-k: `encoder@k<k>`)."""
    refit: float
    """The encoder's support with nonnegative least-squares coefficients."""
    encoder_gp: float
    """Gradient pursuit warm-started from the encoder's codes (`--refine` steps)."""
    gp: float
    """Gradient pursuit from scratch."""
    coefficients: float
    """(encoder - refit) / (encoder - gp): the share of the gap that is wrong coefficients (nan if no gap)."""
    support: float
    """(refit - gp) / (encoder - gp): the share that is wrong support (nan if no gap)."""

    def as_json(self) -> dict:
        """Every field, NaN written as None (JSON null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self._asdict().items()}


def encoder_at_label(k: int) -> str:
    """The report's name for the encoder's top-k codes at k."""
    return f"{_AT}{k}"


def encoder_at_ks(sae: Any, ks: Sequence[int]) -> list[int]:
    """The ks that need an `encoder@k` row: all but a TopK encoder's own k (its row is the encoder's)."""
    own = sae.k if sae.arch.fixed_k else None
    return [k for k in sorted(ks) if k != own]


def decompose(k: int, metric: str, encoder: float, refit: float, encoder_gp: float, gp: float) -> GapDecomposition:
    gap = encoder - gp
    share = lambda part: part / gap if gap else math.nan  # noqa: E731
    return GapDecomposition(k, metric, encoder, refit, encoder_gp, gp, share(encoder - refit), share(refit - gp))


def gap_decompositions(
    rows: Sequence[tuple[str, float | None, Sequence[float]]], metrics: Sequence[str]
) -> list[GapDecomposition]:
    """A decomposition per k and metric where all four rows are present.

    rows: (method as reported, k, one value per metric) for every report row; a method may carry
    the STALE mark. An `encoder@k` row stands for the encoder at its k, before the plain encoder
    row (which counts only at its own TopK k: callers give `encoder@k` rows for every other k).
    """
    found: dict[tuple[str, int], Sequence[float]] = {}
    for method, k, values in rows:
        name = method.removesuffix(STALE)
        if k is None or float(k) != int(k):
            continue
        role = "encoder" if name.startswith(_AT) else name
        if role in ROLES and (name.startswith(_AT) or (role, int(k)) not in found):
            found[role, int(k)] = values
    ks = sorted({k for _, k in found})
    return [
        decompose(k, metric, *(found[r, k][i] for r in ROLES))
        for k in ks
        if all((r, k) in found for r in ROLES)
        for i, metric in enumerate(metrics)
    ]


def format_gaps(gaps: Sequence[GapDecomposition]) -> str:
    """The decompositions as a markdown table; '' when there are none."""
    if not gaps:
        return ""
    lines = [
        "| k | metric | encoder | refit | encoder+gp | gp | coefficients | support |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in gaps:
        v = "+.4f" if g.metric == "ΔCE" else ".4f"
        cells = [format(x, v) for x in (g.encoder, g.refit, g.encoder_gp, g.gp)]
        shares = ["" if math.isnan(s) else f"{s:.0%}" for s in (g.coefficients, g.support)]
        lines.append(f"| {g.k} | {g.metric} | " + " | ".join(cells + shares) + " |")
    return "\n".join(lines)


def gap_section(gaps: Sequence[GapDecomposition]) -> str:
    """The report's gap decomposition: a sentence on how to read it and the table; '' when there are none."""
    if not gaps:
        return ""
    return (
        "Gap decomposition (lower is better): of the encoder → gp gap at each k, `coefficients` is the share "
        "that refitting the encoder's own atoms closes ((encoder − refit) / (encoder − gp)), `support` the share "
        "left to choosing other atoms ((refit − gp) / (encoder − gp)). See docs/pursue.md.\n\n" + format_gaps(gaps)
    )

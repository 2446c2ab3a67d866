"""Ground-truth recovery: does an encoding find the features that are really there?

On synthetic activations (sae-lens's `SyntheticModel`) the true feature directions and every row's
true sparse code are known. Two questions, for any dictionary and any encoding of it:

    dictionary   each learned atom against the true features: MCC (one-to-one Hungarian matching
                 of |cosine|, sae-lens's `mean_correlation_coefficient`), uniqueness (sae-lens's
                 `feature_uniqueness`), and the share of true features whose matched atom has
                 |cosine| >= 0.9
    codes        through that matching, each row's support against its true active features:
                 per-row precision, recall and F1 (means over rows), and on the true positives the
                 correlation of the recovered magnitudes with the true ones and their shrinkage
                 (recovered / true, a ratio of sums: below 1 means the codes shrink)

An atom matched to no true feature (more atoms than features) counts as a false positive wherever
it fires. A recovered magnitude is the code times the atom's length along its matched true feature,
so a dictionary whose atoms are longer or shorter than the true ones is not penalised for it.
`RecoveryStats` streams over batches; `dictionary_recovery` and `match` are computed once per dictionary.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saekit.errors import SaekitError
from saekit.pursuit import SparseCodes

MATCHED_COSINE = 0.9
"""A true feature counts as found when its matched atom has at least this |cosine| with it."""


class DictionaryRecovery(NamedTuple):
    """How well a dictionary's atoms match the true features."""

    mcc: float
    """Mean |cosine| of the one-to-one matched (atom, true feature) pairs (Hungarian), in [0, 1]."""
    uniqueness: float
    """Distinct true features that are some atom's best match, over the number of atoms."""
    matched_09: float
    """Share of true features whose matched atom has |cosine| >= 0.9."""


class Matching(NamedTuple):
    """The one-to-one matching of atoms to true features."""

    feature: Tensor
    """[n_atoms] int64: the true feature each atom is matched to, -1 for an unmatched atom."""
    scale: Tensor
    """[n_atoms] float32: each atom's length along its matched true feature (a recovered
    magnitude is the code times this); 0 for an unmatched atom."""
    cosine: Tensor
    """[n_atoms] float32: |cosine| of each atom with its matched feature; 0 when unmatched."""


def _unit(W: Tensor) -> Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match(atoms: Tensor, truth: Tensor) -> Matching:
    """The Hungarian matching of `atoms` [n_atoms, d] to the true features `truth` [F, d] that
    maximises the summed |cosine| (scipy's `linear_sum_assignment`, as sae-lens's MCC)."""
    from scipy.optimize import linear_sum_assignment  # lazy: scipy takes a moment, only recovery needs it

    atoms, truth = atoms.detach().float().cpu(), truth.detach().float().cpu()
    if atoms.ndim != 2 or truth.ndim != 2 or atoms.shape[1] != truth.shape[1]:
        raise SaekitError(
            f"the dictionary {tuple(atoms.shape)} and the true features {tuple(truth.shape)} are not "
            "[n, d] matrices of the same width: pass the store the SAE was trained on"
        )
    cos = _unit(atoms) @ _unit(truth).T
    rows, cols = linear_sum_assignment((1 - cos.abs()).numpy())
    rows, cols = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    feature = torch.full((atoms.shape[0],), -1, dtype=torch.long)
    feature[rows] = cols
    scale = torch.zeros(atoms.shape[0])
    scale[rows] = (atoms[rows] * _unit(truth)[cols]).sum(1)
    cosine = torch.zeros(atoms.shape[0])
    cosine[rows] = cos[rows, cols].abs()
    return Matching(feature, scale, cosine)


def dictionary_recovery(atoms: Tensor, truth: Tensor, matching: Matching | None = None) -> DictionaryRecovery:
    """MCC, uniqueness and the share of true features found, of `atoms` [n_atoms, d] against the
    true features `truth` [F, d]."""
    # lazy: sae-lens takes seconds to import and only ground-truth reports need its evals
    from sae_lens.synthetic.evals import feature_uniqueness, mean_correlation_coefficient

    m = matching if matching is not None else match(atoms, truth)
    atoms, truth = atoms.detach().float().cpu(), truth.detach().float().cpu()
    found = int((m.cosine >= MATCHED_COSINE).sum())
    return DictionaryRecovery(
        mean_correlation_coefficient(atoms, truth),
        feature_uniqueness(atoms, truth),
        found / truth.shape[0],
    )


class CodeRecovery(NamedTuple):
    """How well an encoding's codes find each row's true active features (through a `Matching`)."""

    precision: float
    """Mean over rows with a recovered feature of the share of recovered features that are active."""
    recall: float
    """Mean over rows with an active feature of the share of active features recovered."""
    f1: float
    """Mean over rows of 2 TP / (2 TP + FP + FN) (1 for a row with neither)."""
    magnitude_corr: float
    """Pearson correlation of recovered and true magnitudes over the true positives (NaN: fewer than two)."""
    shrinkage: float
    """Sum of recovered over sum of true magnitudes on the true positives (NaN: none)."""
    n_rows: int


class RecoveryStats:
    """Streaming `CodeRecovery` over batches: `update(codes, truth)` then `compute()`."""

    def __init__(self, matching: Matching):
        self.m = matching
        self._p = [0.0, 0]  # sum of per-row precision, rows counted
        self._r = [0.0, 0]
        self._f1 = 0.0
        self._rows = 0
        self._xy = np.zeros(5)  # n, sum x, sum y, sum xx, sum yy
        self._sxy = 0.0

    def update(self, codes: SparseCodes, truth: SparseCodes) -> None:
        """codes: an encoding's [b, k] over the matched atoms; truth: the rows' true [b, w] codes
        over the true features (slots holding 0 are not active)."""
        feat, scale = self.m.feature.to(codes.indices.device), self.m.scale.to(codes.indices.device)
        on = codes.values != 0
        f = torch.where(on, feat[codes.indices], -1)  # -1: not fired, or an unmatched atom (a FP)
        mag = codes.values.float() * scale[codes.indices]
        t_idx, t_on = truth.indices.to(f.device).long(), truth.values.to(f.device) > 0
        # a recovered slot is a TP when its feature is among the row's active true features
        hit = (f[:, :, None] == t_idx[:, None, :]) & t_on[:, None, :] & (f[:, :, None] >= 0)
        tp_slot = hit.any(2)
        tp = tp_slot.sum(1).float()
        fp = (on.sum(1) - tp_slot.sum(1)).float()
        fn = (t_on.sum(1) - hit.any(1).sum(1)).float()
        pred, act = tp + fp, tp + fn
        self._p[0] += float((tp / pred.clamp_min(1))[pred > 0].sum())
        self._p[1] += int((pred > 0).sum())
        self._r[0] += float((tp / act.clamp_min(1))[act > 0].sum())
        self._r[1] += int((act > 0).sum())
        denom = 2 * tp + fp + fn
        self._f1 += float(torch.where(denom > 0, 2 * tp / denom.clamp_min(1), 1.0).sum())
        self._rows += codes.values.shape[0]
        # magnitudes of the true positives: recovered (code x atom length) against true
        r, ks, ws = hit.nonzero(as_tuple=True)
        x = mag[r, ks].double()
        y = truth.values.to(f.device)[r, ws].double()
        self._xy += np.array([len(x), float(x.sum()), float(y.sum()), float((x * x).sum()), float((y * y).sum())])
        self._sxy += float((x * y).sum())

    def compute(self) -> CodeRecovery:
        n, sx, sy, sxx, syy = self._xy
        corr = math.nan
        if n >= 2:
            cov, vx, vy = self._sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
            corr = float(cov / math.sqrt(vx * vy)) if vx > 0 and vy > 0 else math.nan
        return CodeRecovery(
            self._p[0] / self._p[1] if self._p[1] else math.nan,
            self._r[0] / self._r[1] if self._r[1] else math.nan,
            self._f1 / self._rows if self._rows else math.nan,
            corr,
            float(sx / sy) if n and sy > 0 else math.nan,
            self._rows,
        )


class Recovery(NamedTuple):
    """One encoding's recovery: its dictionary's (`DictionaryRecovery`) and its codes' (`CodeRecovery`)."""

    mcc: float
    uniqueness: float
    matched_09: float
    precision: float
    recall: float
    f1: float
    magnitude_corr: float
    shrinkage: float

    @classmethod
    def of(cls, d: DictionaryRecovery, c: CodeRecovery) -> Recovery:
        return cls(d.mcc, d.uniqueness, d.matched_09, c.precision, c.recall, c.f1, c.magnitude_corr, c.shrinkage)

    def as_json(self) -> dict:
        """Every field, NaN written as None (JSON null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self._asdict().items()}


class TruthRows:
    """What recovery needs of a store with ground truth: its true features, and each dictionary's
    matching to them (computed once per dictionary)."""

    def __init__(self, features: Tensor):
        self.features = features.detach().float().cpu()
        self._matched: dict[int, tuple[Matching, DictionaryRecovery]] = {}

    def of(self, W: Tensor) -> tuple[Matching, DictionaryRecovery]:
        """The matching of dictionary W [n_atoms, d] (raw space) and its `DictionaryRecovery`."""
        key = id(W)
        if key not in self._matched:
            m = match(W, self.features)
            self._matched[key] = (m, dictionary_recovery(W, self.features, m))
        return self._matched[key]


def _fmt(v: float, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def recovery_section(rows: list[tuple[str, float | None, float, Recovery]]) -> str:
    """A report's ground-truth section: rows of (method, k, FVU, Recovery), the first being the
    encoder's; each later row shows its FVU gain and F1 change against it (reconstruction bought
    without truth shows as an FVU gain with an F1 loss)."""
    _, _, fvu0, r0 = rows[0]
    lines = [
        "## Ground truth (held-out rows of a synthetic store)",
        "",
        "MCC, uniqueness and found (|cos| >= 0.9) are the dictionary's against the true features; precision, "
        "recall and F1 are each row's support (through the Hungarian matching) against its true active features; "
        "magnitudes are on the true positives. FVU gain and ΔF1 are against the first row (the SAE's encoder).",
        "",
        "| method | k | MCC | uniqueness | found | precision | recall | F1 | magnitude corr | shrinkage | FVU gain | ΔF1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, k, fvu, r in rows:
        cells = [
            method,
            "" if k is None else f"{k:g}",
            _fmt(r.mcc, ".4f"),
            _fmt(r.uniqueness, ".4f"),
            _fmt(r.matched_09, ".3f"),
            _fmt(r.precision, ".4f"),
            _fmt(r.recall, ".4f"),
            _fmt(r.f1, ".4f"),
            _fmt(r.magnitude_corr, ".4f"),
            _fmt(r.shrinkage, ".4f"),
            _fmt(fvu0 - fvu, "+.4f"),
            _fmt(r.f1 - r0.f1, "+.4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

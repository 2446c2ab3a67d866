"""Ground-truth recovery (saekit.measure.recovery) on sae-lens's own synthetic model: the figures
equal a brute-force computation, the true dictionary scores 1, and OMP at the true support size
finds the true features of noise-free rows."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from saekit.errors import SaekitError
from saekit.measure.recovery import RecoveryStats, dictionary_recovery, match
from saekit.pursuit import SparseCodes, pursuit

F, D = 96, 48


def _model(seed: int = 0):
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig

    cfg = SyntheticModelConfig(
        num_features=F,
        hidden_dim=D,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.08, min_prob=0.01),
        std_firing_magnitudes=0.3,
        bias=False,
        seed=seed,
    )
    return SyntheticModel(cfg)


def _sparse(dense: torch.Tensor) -> SparseCodes:
    w = max(1, int((dense != 0).sum(1).max()))
    values, indices = dense.topk(w, dim=1)
    return SparseCodes(indices, values)


def _rows(n: int = 400, seed: int = 0):
    model = _model(seed)
    torch.manual_seed(seed)
    x, feats = model.sample_with_features(n)
    return model.feature_dict.feature_vectors.detach(), x, feats


def _brute_force(atoms, truth, codes: SparseCodes, true_dense):
    """Hungarian matching by scipy on |cosine|, then per-row Python sets."""
    a = atoms / atoms.norm(dim=1, keepdim=True)
    t = truth / truth.norm(dim=1, keepdim=True)
    cos = (a @ t.T).abs().numpy()
    rows, cols = linear_sum_assignment(-cos)
    to_feature = dict(zip(rows.tolist(), cols.tolist()))
    mcc = float(cos[rows, cols].mean())
    found = float((cos[rows, cols] >= 0.9).sum()) / truth.shape[0]
    ps, rs, f1s, xs, ys = [], [], [], [], []
    for i in range(codes.indices.shape[0]):
        fired = {int(j) for j, v in zip(codes.indices[i], codes.values[i]) if v != 0}
        pred = {to_feature.get(j, ("unmatched", j)) for j in fired}
        act = {int(f) for f in (true_dense[i] > 0).nonzero().flatten()}
        tp = pred & act
        if pred:
            ps.append(len(tp) / len(pred))
        if act:
            rs.append(len(tp) / len(act))
        denom = 2 * len(tp) + len(pred - act) + len(act - pred)
        f1s.append(2 * len(tp) / denom if denom else 1.0)
        for j in fired:
            f = to_feature.get(j)
            if f in act:
                v = float(codes.values[i][codes.indices[i] == j][0])
                xs.append(v * float(atoms[j] @ t[f]))
                ys.append(float(true_dense[i, f]))
    return mcc, found, np.mean(ps), np.mean(rs), np.mean(f1s), np.corrcoef(xs, ys)[0, 1], sum(xs) / sum(ys)


def test_recovery_equals_a_brute_force_computation():
    truth, x, feats = _rows()
    g = torch.Generator().manual_seed(1)
    # a noisy, scaled, shuffled copy of most true features plus atoms that match nothing well
    keep = torch.randperm(F, generator=g)[:80]
    atoms = truth[keep] * (0.5 + torch.rand(80, 1, generator=g)) + 0.3 * torch.randn(80, D, generator=g) / D**0.5
    atoms = torch.cat([atoms, torch.randn(40, D, generator=g)])  # 120 atoms > 96 features: some unmatched
    codes = pursuit(x, atoms, 6, method="gp", dense=False)
    stats = RecoveryStats(match(atoms, truth))
    for lo in range(0, x.shape[0], 128):  # streamed in batches
        stats.update(
            SparseCodes(codes.indices[lo : lo + 128], codes.values[lo : lo + 128]), _sparse(feats[lo : lo + 128])
        )
    got = stats.compute()
    d = dictionary_recovery(atoms, truth)
    mcc, found, p, r, f1, corr, shrink = _brute_force(atoms, truth, codes, feats)
    assert d.mcc == pytest.approx(mcc, abs=1e-5)
    assert d.matched_09 == pytest.approx(found)
    assert 0 < d.uniqueness <= 1
    assert (got.precision, got.recall, got.f1) == pytest.approx((p, r, f1), abs=1e-6)
    assert got.magnitude_corr == pytest.approx(corr, abs=1e-6)
    assert got.shrinkage == pytest.approx(shrink, abs=1e-6)
    assert got.n_rows == x.shape[0]
    assert 0 < got.f1 < 1  # a case that can fail either way


def test_the_true_dictionary_scores_one_and_omp_at_the_true_support_finds_the_features():
    truth, x, feats = _rows()
    d = dictionary_recovery(truth, truth)
    assert d.mcc == pytest.approx(1.0, abs=1e-6) and d.matched_09 == 1.0 and d.uniqueness == 1.0
    # noise-free rows (no bias): OMP with k = the most active features of any row
    k = int((feats > 0).sum(1).max())
    codes = pursuit(x, truth, k, method="omp", dense=False)
    stats = RecoveryStats(match(truth, truth))
    stats.update(codes, _sparse(feats))
    r = stats.compute()
    assert r.recall > 0.99 and r.f1 > 0.95, r
    assert r.magnitude_corr > 0.99 and r.shrinkage == pytest.approx(1.0, abs=0.02), r
    # a random dictionary of the same size finds little
    rand = torch.randn(F, D, generator=torch.Generator().manual_seed(3))
    assert dictionary_recovery(rand, truth).mcc < 0.5


def test_a_dictionary_of_another_width_is_one_line():
    truth, _, _ = _rows(8)
    with pytest.raises(SaekitError, match="same width"):
        match(torch.randn(10, D + 1), truth)


def test_rows_without_active_features_or_codes_count_as_agreeing():
    truth, _, _ = _rows(8)
    stats = RecoveryStats(match(truth, truth))
    none = SparseCodes(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    stats.update(none, none)
    r = stats.compute()
    assert r.f1 == 1.0 and math.isnan(r.precision) and math.isnan(r.recall) and math.isnan(r.shrinkage)

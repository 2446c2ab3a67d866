"""Metrics: whole-set FVU, streaming equals one-shot, sae-lens agreement, dead/dense latents."""

import pytest
import torch

from saekit.errors import SaekitError
from saekit.metrics import (
    FiringTracker,
    ReconstructionStats,
    compute_metrics,
    cosine_similarity,
    explained_variance,
    fvu,
    l0,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _set(n=600, d=16, n_features=40):
    x = torch.randn(n, d) * 3 + torch.linspace(-5, 5, d)
    x_hat = x + 0.5 * torch.randn(n, d)
    codes = torch.relu(torch.randn(n, n_features) - 1.0)
    return x, x_hat, codes


def test_compute_metrics_original_contract():
    x, x_hat, codes = _set()
    l0_value, fvu_value = compute_metrics(x, codes, x_hat)
    assert isinstance(l0_value, float) and isinstance(fvu_value, float)
    assert l0_value == pytest.approx((codes > 0).sum().item() / len(codes))
    assert compute_metrics(x, codes, x)[1] == 0.0  # perfect reconstruction
    mean_only = x.mean(0).expand_as(x)
    assert compute_metrics(x, codes, mean_only)[1] == pytest.approx(1.0, abs=1e-6)  # predicts the mean


def test_streaming_stats_equal_whole_set_values_not_per_batch_averages():
    x, x_hat, codes = _set()
    # Batches with different means: per-batch FVUs divide by each batch's own (smaller) variance.
    order = x[:, 0].argsort()
    x, x_hat, codes = x[order], x_hat[order], codes[order]
    stats = ReconstructionStats()
    for xb, hb, cb in zip(x.split(100), x_hat.split(100), codes.split(100)):
        stats.update(xb, hb, cb)
    m = stats.compute()
    assert m.n_tokens == len(x)
    assert m.fvu == pytest.approx(fvu(x, x_hat).item(), rel=1e-5)
    assert m.explained_variance == pytest.approx(explained_variance(x, x_hat).item(), rel=1e-5)
    assert m.l0 == pytest.approx(l0(codes).item(), rel=1e-6)
    assert m.l1 == pytest.approx(codes.abs().sum(1).mean().item(), rel=1e-5)
    assert m.cossim == pytest.approx(cosine_similarity(x, x_hat).item(), rel=1e-5)
    assert m.mse == pytest.approx((x - x_hat).pow(2).sum(1).mean().item(), rel=1e-5)
    per_batch = sum(fvu(xb, hb).item() for xb, hb in zip(x.split(100), x_hat.split(100))) / 6
    assert per_batch > m.fvu * 1.05  # the bias the whole-set mean avoids


def test_explained_variance_agrees_with_sae_lens():
    import sae_lens.evals as evals

    x, x_hat, codes = _set()
    calc = evals.ExplainedVarianceCalculator()
    stats = ReconstructionStats()
    for xb, hb in zip(x.split(128), x_hat.split(128)):
        calc.add_batch(sae_output=hb, hidden_acts=xb)
        stats.update(xb, hb)
    assert stats.compute().explained_variance == pytest.approx(calc.compute(), rel=1e-5)
    assert stats.compute().l0 != stats.compute().l0  # nan: no codes were given


def test_stats_errors():
    with pytest.raises(SaekitError, match="no batches"):
        ReconstructionStats().compute()
    with pytest.raises(SaekitError, match="differ in shape"):
        ReconstructionStats().update(torch.zeros(4, 8), torch.zeros(4, 7))


def test_firing_tracker_dead_and_dense_latents():
    tracker = FiringTracker(n_features=6, window=100, dense_threshold=0.5)
    codes = torch.zeros(50, 6)
    codes[:, 0] = 1.0  # fires on every token: dense
    codes[::10, 1] = 1.0  # fires on 10% of tokens
    codes[0, 2] = 1.0  # fires once, at the start
    tracker.update(codes)
    assert not tracker.dead_mask().any()  # nobody silent for a full window yet
    tracker.update(codes[1:])  # latent 2 is silent in this batch
    tracker.update(torch.zeros(60, 6))
    dead = tracker.dead_mask()
    assert dead.tolist() == [False, False, True, True, True, True]
    assert tracker.dense_mask().tolist() == [True, False, False, False, False, False]
    stats = tracker.compute()
    assert (stats.n_dead, stats.n_dense) == (4, 1)
    # A firing revives a dead latent; state_dict round trips.
    revive = torch.zeros(1, 6)
    revive[0, 3] = 2.0
    tracker.update(revive)
    assert not tracker.dead_mask()[3]
    clone = FiringTracker(n_features=6, window=100, dense_threshold=0.5)
    clone.load_state_dict(tracker.state_dict())
    assert torch.equal(clone.dead_mask(), tracker.dead_mask())
    assert torch.equal(clone.feature_density(), tracker.feature_density())

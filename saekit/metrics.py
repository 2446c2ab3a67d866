"""Reconstruction and sparsity metrics, named as sae-lens's evals name them where it has a name.

Shapes: activations `x` and reconstructions `x_hat` are `[tokens, d_in]`, codes `[tokens, n_features]`.

FVU (fraction of variance unexplained) is measured against the mean of the *whole evaluation set*:
sum ||x - x_hat||^2 / sum ||x - mean(x)||^2. Averaging per-batch FVUs instead (as the original
sae-kit did) divides by each batch's own variance, which is smaller and noisier than the set's, so
it overstates FVU on small batches. Stream a large set through `ReconstructionStats`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saekit.errors import SaekitError

# --------------------------------------------------------------------------------------------
# One-shot functions (the whole set is in memory)
# --------------------------------------------------------------------------------------------


def l0(codes: torch.Tensor) -> torch.Tensor:
    """Mean number of nonzero latents per token. codes: [tokens, n] -> scalar."""
    return (codes != 0).sum(dim=-1).float().mean()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained against the mean of this whole set. [tokens, d] x2 -> scalar."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (residual / total).float()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - FVU (sae-lens's `explained_variance`). [tokens, d] x2 -> scalar."""
    return 1 - fvu(x, x_hat)


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between each token and its reconstruction (sae-lens `cossim`)."""
    return torch.nn.functional.cosine_similarity(x.float(), x_hat.float(), dim=-1, eps=1e-8).mean()


@torch.no_grad()
def compute_metrics(
    activations: torch.Tensor, features: torch.Tensor, reconstruction: torch.Tensor
) -> tuple[float, float]:
    """(l0, fvu) as Python floats, the original sae-kit helper.

    activations: [tokens, d]; features: [tokens, n] codes; reconstruction: [tokens, d].
    FVU is against the mean of the activations passed in; for more tokens than fit in one call use
    `ReconstructionStats`.
    """
    _check_same_shape(activations, reconstruction)
    return float(l0(features)), float(fvu(activations, reconstruction))


def _check_same_shape(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape:
        raise SaekitError(
            f"activations {tuple(x.shape)} and reconstruction {tuple(x_hat.shape)} differ in shape: pass matching [tokens, d] tensors"
        )


# --------------------------------------------------------------------------------------------
# Streaming reconstruction statistics
# --------------------------------------------------------------------------------------------


class ReconstructionMetrics(NamedTuple):
    """Metrics over every token seen by a `ReconstructionStats`."""

    l0: float
    """Mean nonzero latents per token (nan if no codes were given)."""
    l1: float
    """Mean sum of |codes| per token (nan if no codes were given)."""
    mse: float
    """Mean squared reconstruction error per token, summed over dimensions: E||x - x_hat||^2."""
    explained_variance: float
    """1 - fvu."""
    fvu: float
    """sum ||x - x_hat||^2 / sum ||x - mean||^2, with the mean of all tokens seen."""
    cossim: float
    """Mean cosine similarity of x and x_hat."""
    l2_ratio: float
    """Mean ||x_hat|| / ||x||: below 1 means shrinkage."""
    n_tokens: int
    """Tokens seen."""


class ReconstructionStats:
    """Accumulates sums over batches (float64, on the inputs' device) and reports whole-set metrics.

    stats = ReconstructionStats()
    for x in batches: out = sae(x); stats.update(x, out.reconstruction, out.codes)
    stats.compute().fvu
    """

    # Layout of the scalar sums, kept in one vector so each batch adds to them in one operation.
    _FIELDS = ("n", "sq_norm", "sq_err", "cossim", "l2_ratio", "l0", "l1", "n_codes")

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # [len(_FIELDS)]
        self._sum_x: torch.Tensor | None = None  # [d]

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """x, x_hat: [tokens, d] (leading dims are flattened); codes: [tokens, n_features] or None."""
        _check_same_shape(x, x_hat)
        x = x.reshape(-1, x.shape[-1]).double()
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()
        if self._sum_x is not None and self._sum_x.numel() != x.shape[-1]:
            raise SaekitError(
                f"batch has d={x.shape[-1]} but earlier batches had d={self._sum_x.numel()}: use one stats object per SAE"
            )
        x_norm = x.norm(dim=-1)
        zero = x.new_zeros(())
        if codes is not None:
            codes = codes.reshape(-1, codes.shape[-1])
            l0_sum, l1_sum, n_codes = (
                (codes != 0).sum().double(),
                codes.double().abs().sum(),
                x.new_tensor(codes.shape[0]),
            )
        else:
            l0_sum, l1_sum, n_codes = zero, zero, zero
        batch = torch.stack(
            [
                x.new_tensor(x.shape[0]),
                x.pow(2).sum(),
                (x - x_hat).pow(2).sum(),
                torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum(),
                (x_hat.norm(dim=-1) / x_norm.clamp_min(1e-8)).sum(),
                l0_sum,
                l1_sum,
                n_codes,
            ]
        )
        if self._sums is None or self._sum_x is None:
            self._sums, self._sum_x = batch, x.sum(dim=0)
        else:
            self._sums += batch
            self._sum_x += x.sum(dim=0)

    def compute(self) -> ReconstructionMetrics:
        if self._sums is None:
            raise SaekitError("no batches were given to ReconstructionStats.update: evaluate at least one batch first")
        s = dict(zip(self._FIELDS, self._sums.tolist()))
        n, n_codes = s["n"], s["n_codes"]
        mean_sq = (self._sum_x / n).pow(2).sum().item()
        # Var = E||x||^2 - ||E x||^2, summed over dims; both sums are float64 to limit cancellation.
        total_var = s["sq_norm"] / n - mean_sq
        fvu_value = (s["sq_err"] / n) / total_var if total_var > 0 else float("nan")
        return ReconstructionMetrics(
            l0=s["l0"] / n_codes if n_codes else float("nan"),
            l1=s["l1"] / n_codes if n_codes else float("nan"),
            mse=s["sq_err"] / n,
            explained_variance=1 - fvu_value,
            fvu=fvu_value,
            cossim=s["cossim"] / n,
            l2_ratio=s["l2_ratio"] / n,
            n_tokens=int(n),
        )


# --------------------------------------------------------------------------------------------
# Dead and dense latents
# --------------------------------------------------------------------------------------------


class FiringStats(NamedTuple):
    """Dead and dense latents according to a `FiringTracker`."""

    n_dead: int
    """Latents that have not fired in the last `window` tokens."""
    n_dense: int
    """Latents firing on more than `dense_threshold` of the tokens of the last full window."""
    frac_dead: float
    frac_dense: float


class FiringTracker:
    """Tracks, per latent, tokens since it last fired (dead latents) and its firing frequency
    (dense latents, sae-lens's `feature_density`) over windows of `window` tokens.

    The trainer reads `dead_mask()` for the AuxK loss; `state_dict()` lets it resume.
    """

    def __init__(
        self, n_features: int, window: int, dense_threshold: float = 0.1, device: torch.device | str | None = None
    ):
        if window <= 0:
            raise SaekitError(f"window={window} must be a positive number of tokens")
        if not 0 < dense_threshold <= 1:
            raise SaekitError(f"dense_threshold={dense_threshold} must be a firing frequency in (0, 1]")
        self.window = int(window)
        self.dense_threshold = float(dense_threshold)
        self.tokens_since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
        """[n] tokens seen since each latent last fired."""
        self.fire_counts = torch.zeros(n_features, dtype=torch.long, device=device)
        """[n] firings in the current (unfinished) window."""
        self.window_tokens = 0
        self.last_density: torch.Tensor | None = None
        """[n] firing frequency over the last finished window."""

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """codes: [tokens, n_features] (leading dims are flattened)."""
        codes = codes.reshape(-1, codes.shape[-1])
        if codes.shape[-1] != self.fire_counts.numel():
            raise SaekitError(f"codes have {codes.shape[-1]} latents but the tracker has {self.fire_counts.numel()}")
        self.update_counts((codes != 0).sum(dim=0), codes.shape[0])

    @torch.no_grad()
    def update_counts(self, counts: torch.Tensor, n_tokens: int) -> None:
        """counts: [n] tokens on which each latent fired, out of n_tokens (e.g. summed over ranks)."""
        counts = counts.to(self.fire_counts.device)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        self.fire_counts += counts.round().long()
        self.window_tokens += n_tokens
        # A window closes at the first update that reaches `window` tokens (so it can be a bit longer).
        if self.window_tokens >= self.window:
            self.last_density = self.fire_counts.double() / self.window_tokens
            self.fire_counts.zero_()
            self.window_tokens = 0

    def dead_mask(self) -> torch.Tensor:
        """[n] bool: latents silent for at least `window` tokens."""
        return self.tokens_since_fired >= self.window

    def feature_density(self) -> torch.Tensor:
        """[n] firing frequency over the last full window (the current partial one before that)."""
        if self.last_density is not None:
            return self.last_density
        return self.fire_counts.double() / max(self.window_tokens, 1)

    def dense_mask(self) -> torch.Tensor:
        """[n] bool: latents firing on more than `dense_threshold` of tokens."""
        return self.feature_density() > self.dense_threshold

    def compute(self) -> FiringStats:
        n = self.fire_counts.numel()
        n_dead, n_dense = int(self.dead_mask().sum()), int(self.dense_mask().sum())
        return FiringStats(n_dead=n_dead, n_dense=n_dense, frac_dead=n_dead / n, frac_dense=n_dense / n)

    def state_dict(self) -> dict:
        return {
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "window_tokens": self.window_tokens,
            "last_density": None if self.last_density is None else self.last_density.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.tokens_since_fired.device
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.fire_counts = state["fire_counts"].to(device)
        self.window_tokens = int(state["window_tokens"])
        self.last_density = None if state.get("last_density") is None else state["last_density"].to(device)

"""JumpReLU training: a learned threshold per latent, trained through straight-through estimators,
with sae-lens's three sparsity losses (`JumpReLUTrainingSAE`, whose formulas these are):

    step        DeepMind's JumpReLU (Rajamanoharan et al. 2024): coef * L0, the L0 a sum of
                Heaviside steps whose gradient reaches the thresholds through a rectangle kernel
                of width `bandwidth`
    tanh        Anthropic's: coef * sum tanh(tanh_scale * code * ||d_i||), usually with the
                pre-activation loss on dead latents (`pre_act_coef`)
    quadratic   Gemma Scope 2's: coef * 2 / L0* * (L0 - L0*)^2, pulling each row's L0 toward the
                target L0* (saekit's --k)

The JumpReLU is the encoder's own (codes = pre * (pre > threshold)); only its gradient is new: the
threshold's through the kernel, and with `ste_to_input` (Anthropic's setup) the pre-activations'
too. The coefficients are sae-lens's, on the summed-over-d squared error of inputs normalized to
E||x||^2 = d_in (as saekit normalizes them), so values that work in sae-lens work here; saekit's
loss divides every term by the store's variance to read as an FVU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

SPARSITY_LOSSES = ("step", "tanh", "quadratic")
DEFAULT_L0_COEF = {"step": 1.0, "tanh": 1.0, "quadratic": 1.0}
"""--l0-coef's default for each sparsity loss (measured in docs/train.md)."""


class JumpReLUTraining(NamedTuple):
    """The JumpReLU training settings (`TrainConfig`'s --sparsity-loss ... --ste-to-input)."""

    mode: str  # one of SPARSITY_LOSSES
    bandwidth: float  # width of the rectangle kernel of the straight-through estimators
    l0_coef: float  # weight of the sparsity loss once warmed up
    target_l0: float  # the quadratic loss's L0* (unused by step and tanh)
    tanh_scale: float  # the tanh loss's scale
    pre_act_coef: float  # weight of the pre-activation loss on dead latents; 0 turns it off
    ste_to_input: bool  # the estimators' gradient also reaches the pre-activations (the encoder)


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); d/dthreshold through the kernel: -(threshold / bw) * rect((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        ste = (threshold / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        grad_pre = (pre > threshold) * grad
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, -ste.sum(0), None, None


class _Step(torch.autograd.Function):
    """(pre > threshold); d/dthreshold through the kernel: -(1 / bw) * rect((pre - threshold) / bw)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return (ste if ctx.ste_to_input else None), -ste.sum(0), None, None


def jumprelu_codes(pre: Tensor, threshold: Tensor, spec: JumpReLUTraining) -> Tensor:
    """pre-activations [b, n], threshold [n] -> codes [b, n], with the estimators' gradient."""
    return _JumpReLU.apply(pre, threshold, spec.bandwidth, spec.ste_to_input)  # type: ignore[return-value]


def sparsity_loss(pre: Tensor, codes: Tensor, threshold: Tensor, W_dec: Tensor, spec: JumpReLUTraining) -> Tensor:
    """The sparsity loss before its coefficient, a mean over the batch's rows.

    pre, codes: [b, n]; threshold: [n]; W_dec: [n, d] -> scalar.
    """
    if spec.mode == "tanh":
        return torch.tanh(spec.tanh_scale * codes * W_dec.norm(dim=1)).sum(-1).mean()
    l0 = _Step.apply(pre, threshold, spec.bandwidth, spec.ste_to_input).sum(-1)  # type: ignore[union-attr]
    if spec.mode == "quadratic":
        return (2 / spec.target_l0 * (l0 - spec.target_l0) ** 2).mean()
    return l0.mean()


def pre_act_loss(pre: Tensor, threshold: Tensor, dead: Tensor, W_dec: Tensor) -> Tensor:
    """Anthropic's pre-activation loss on the dead latents: how far below its threshold each one's
    pre-activation sits, times its atom's norm; a mean over rows (0 when none is dead).

    pre: [b, n]; threshold: [n]; dead: [n] bool; W_dec: [n, d] -> scalar."""
    if not bool(dead.any()):
        return pre.new_zeros(())
    return ((threshold - pre).relu() * dead * W_dec.norm(dim=1)).sum(-1).mean()


@torch.no_grad()
def start_thresholds_(encoder: Any, sae_in: Tensor, b_dec: Tensor, target_l0: float) -> float:
    """Set every threshold to the one value at which normalized rows sae_in [rows, d] keep
    `target_l0` latents each on average (halfway between the (target_l0 * rows)-th largest
    pre-activation and the next): training starts at the L0 it aims for, rather than at a ReLU's
    L0 that the thresholds, moving about lr per step, would take thousands of steps to leave."""
    pre = encoder.pre_activations(sae_in, b_dec).flatten().float()
    m = min(max(1, int(target_l0 * sae_in.shape[0])), pre.numel() - 1)
    top = pre.topk(m + 1).values
    value = max(0.0, float(top[m - 1] + top[m]) / 2)
    encoder.threshold.fill_(value)
    return value


def l0_coef_at(step: int, coef: float, warmup_steps: int) -> float:
    """The sparsity coefficient at 0-based `step`: rising linearly from coef / warmup_steps to coef
    over the first warmup_steps steps (sae-lens's `CoefficientScheduler`), then coef."""
    if warmup_steps and step < warmup_steps:
        return coef * (step + 1) / warmup_steps
    return coef

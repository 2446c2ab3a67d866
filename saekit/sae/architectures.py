"""The one table of SAE architectures: what each activation does and what saekit may do with it.

An `Architecture` knows its forward (the activation, from pre-activations to codes), what k means
for it, whether it has exactly k codes per row (so the sparse decode, unrolled refinement steps
and sae-lens's own ranking apply), whether it has a threshold to calibrate after training, whether
`saekit train` trains it, and how it is named in sae-lens (the architectures it loads from, and
the one it exports as). Every other module asks the SAE's `arch` (`architecture(name)`) instead of
comparing activation names.

Adding an architecture is one subclass here and one entry in `ARCHITECTURES` (see
docs/architecture.md, "How to add").
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

from saekit.errors import SaekitError

K_MEANING = Literal["per_row", "mean", "none"]


class Architecture(ABC):
    """One activation (subclasses set the class attributes and `activate`)."""

    name: str = ""
    k: K_MEANING = "none"
    """'per_row': exactly k codes per row (TopK); 'mean': k per row on average over a batch
    (Batch-TopK); 'none': no k (ReLU, JumpReLU)."""
    calibrates: bool = False
    """It keeps a threshold that training estimates and fixes after the last step (Batch-TopK)."""
    trainable: bool = False
    """`saekit train --activation NAME` trains it."""
    learns_threshold: bool = False
    """Its threshold is a parameter that training learns (JumpReLU), not a buffer."""
    sae_lens_loads: tuple[str, ...] = ()
    """The sae-lens architectures (cfg.json `architecture`) loaded as this one."""
    sae_lens_exports: str = ""
    """The sae-lens inference architecture an export writes (its class's weights)."""

    @property
    def fixed_k(self) -> bool:
        """Exactly k codes per row: its codes are k (index, value) pairs, the sparse decode and
        unrolled refinement apply, and an encoder's top-k at its own k is its output."""
        return self.k == "per_row"

    @property
    def has_k(self) -> bool:
        return self.k != "none"

    def initial_threshold(self) -> float:
        """The threshold buffer's value in a new encoder (NaN: not estimated yet)."""
        return math.nan if self.calibrates else 0.0

    @abstractmethod
    def activate(self, pre: torch.Tensor, k: float | None, threshold: torch.Tensor, training: bool) -> torch.Tensor:
        """pre-activations [..., n] -> codes [..., n] (dense, mostly zeros), given the encoder's k,
        its threshold buffer [n] and whether it is training."""

    def check_k(self, k: float | None, n_features: int) -> float | int | None:
        """The k this architecture takes (an int for 'per_row'), or one line saying what is wrong."""
        from saekit.config import check_k  # config imports nothing of saekit's SAE modules

        if not self.has_k:
            return k
        if k is None:
            raise SaekitError(f"activation {self.name!r} needs k (active latents per token): pass k=")
        check_k(k, n_features)
        if self.fixed_k:
            if float(k) != int(k):
                raise SaekitError(f"k={k} must be a whole number for TopK (Batch-TopK allows a fractional average)")
            return int(k)
        return k


def topk_activation(pre_acts: torch.Tensor, k: int, rank: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k largest pre-activations of each row (the k largest of `rank` [..., n] where given:
    the same entries, ranked otherwise), ReLU them, zero the rest.

    pre_acts: [..., n] -> codes [..., n] with at most k nonzeros per row.
    """
    if rank is None:
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    else:
        indices = rank.topk(k, dim=-1, sorted=False).indices
        values = pre_acts.gather(-1, indices)
    return torch.zeros_like(pre_acts).scatter_(-1, indices, values.relu())


def batch_topk_activation(pre_acts: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the int(k * rows) largest ReLU'd pre-activations of the whole batch (k per row on average).

    pre_acts: [..., n] -> codes [..., n].
    """
    acts = pre_acts.relu()
    flat = acts.flatten()
    n_rows = acts.shape[:-1].numel()
    values, indices = flat.topk(int(k * n_rows), sorted=False)
    return torch.zeros_like(flat).scatter_(-1, indices, values).reshape(acts.shape)


def jumprelu_activation(pre_acts: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReLU, keeping only latents whose pre-activation exceeds its threshold (as sae-lens does).

    pre_acts: [..., n], threshold: [n] -> codes [..., n].
    """
    return pre_acts.relu() * (pre_acts > threshold).to(pre_acts.dtype)


class TopK(Architecture):
    name, k, trainable = "topk", "per_row", True
    sae_lens_loads, sae_lens_exports = ("topk",), "topk"

    def activate(self, pre, k, threshold, training):
        assert k is not None  # SAEConfig checks it
        return topk_activation(pre, int(k))


class BatchTopK(Architecture):
    name, k, calibrates, trainable = "batchtopk", "mean", True, True
    sae_lens_loads, sae_lens_exports = ("batchtopk", "matryoshka_batchtopk"), "jumprelu"

    def activate(self, pre, k, threshold, training):
        # Batch-level selection while training; at inference the threshold makes each token's code
        # independent of its batch (and a fresh SAE, whose threshold is unknown, falls back to batches).
        assert k is not None  # SAEConfig checks it
        if training or bool(threshold.isnan().any()):
            return batch_topk_activation(pre, k)
        return jumprelu_activation(pre, threshold)


class ReLU(Architecture):
    name = "relu"
    sae_lens_loads, sae_lens_exports = ("standard",), "standard"

    def activate(self, pre, k, threshold, training):
        return pre.relu()


class JumpReLU(Architecture):
    name, trainable, learns_threshold = "jumprelu", True, True
    sae_lens_loads, sae_lens_exports = ("jumprelu",), "jumprelu"

    def activate(self, pre, k, threshold, training):
        return jumprelu_activation(pre, threshold)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (TopK(), BatchTopK(), ReLU(), JumpReLU())}
"""Every architecture saekit knows, by name (an SAE config's `activation`)."""
ACTIVATIONS = tuple(ARCHITECTURES)
TRAINABLE = tuple(name for name, a in ARCHITECTURES.items() if a.trainable)


def architecture(name: str) -> Architecture:
    """The architecture called `name`, or one line naming the ones there are."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise SaekitError(f"unknown activation {name!r}: use one of {', '.join(ARCHITECTURES)}") from None


def sae_lens_native(arch: str) -> Architecture | None:
    """The architecture a sae-lens SAE of architecture `arch` loads as; None when saekit cannot."""
    return next((a for a in ARCHITECTURES.values() if arch in a.sae_lens_loads), None)


def sae_lens_loadable() -> list[str]:
    return sorted(n for a in ARCHITECTURES.values() for n in a.sae_lens_loads)

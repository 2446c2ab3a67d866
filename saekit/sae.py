"""The SparseAutoencoder: an `Encoder` (linear, plus an optional MLP path) and a `Decoder` (the dictionary).

Shapes: `x` is `[..., d_in]` (usually `[batch, d_in]`), codes are dense `[..., n_features]` in the
parameters' dtype (float32 unless you ask for another). Inputs of any float dtype (e.g. the cache's
bf16) are cast to the parameters' dtype first.

Spaces. The dictionary lives in a *normalized* space: `x_n = (x - input_mean) * input_scale`.
Both buffers sit on the `Decoder` (they define the space its atoms live in, so a decoder handed to a
new encoder keeps them) and are the identity unless `set_input_normalization` sets them from the
cache's statistics. `SparseAutoencoder.encode` takes raw activations and `decode` returns raw
activations; `Decoder.raw_dictionary()` gives the equivalent raw-space atoms for pursuit code.

Loading sae-lens SAEs (`from_pretrained`, `from_sae_lens`) and exporting to sae-lens
(`export_sae_lens`) are methods here, implemented in `saekit.sae_lens_io`. `load_sae(spec)` at the
bottom is the one loader for every kind of SAE (run dir, saekit dir, sae-lens dir or release).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from saekit.config import check_k, check_non_negative
from saekit.devices import dtype_name, resolve_dtype
from saekit.errors import SaekitError, is_non_empty, one_line

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SAE_LENS_CONFIG = "cfg.json"
FORMAT_NAME = "saekit-sae"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Config and return types
# --------------------------------------------------------------------------------------------


@dataclass
class SAEConfig:
    """Everything needed to rebuild a SparseAutoencoder's modules (saved as `config.json`)."""

    d_in: int
    """Width of the activations the SAE reads (the hooked model's d_model)."""
    n_features: int
    """Number of dictionary atoms (latents)."""
    activation: str = "topk"
    """'topk' (k per token), 'batchtopk' (k per token on average over a batch; a running threshold
    at inference), 'relu', or 'jumprelu' (a per-latent threshold; loaded SAEs)."""
    k: float | None = None
    """Active latents per token for 'topk' (an integer) or per token on average for 'batchtopk'."""
    d_hidden: int | None = None
    """Width of the MLP path's hidden layers; required when n_hidden > 0."""
    n_hidden: int = 0
    """Hidden layers in the MLP path added to the linear encoder; 0 means a plain linear encoder."""
    apply_preencoder_bias: bool = True
    """Subtract the decoder's b_dec from the input before encoding (sae-lens `apply_b_dec_to_input`)."""
    threshold_lr: float = 0.01
    """Batch-TopK: rate of the running (exponential) average of the smallest kept activation."""
    dtype: str = "float32"
    """Parameter dtype: 'float32', 'float64', 'bfloat16' or 'float16' (or an alias in saekit.devices.DTYPES)."""
    metadata: dict = field(default_factory=dict)
    """Free-form provenance kept through save/load/export (e.g. model_name, hook_name, source)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SaekitError(f"unknown activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.d_in <= 0 or self.n_features <= 0:
            raise SaekitError(f"d_in={self.d_in} and n_features={self.n_features} must both be positive")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise SaekitError(f"activation {self.activation!r} needs k (active latents per token): pass k=")
            _check_k_range(self.k, self.n_features, integer=self.activation == "topk")
            if self.activation == "topk":
                self.k = int(self.k)
        check_non_negative("n_hidden", self.n_hidden, "no MLP path")
        if self.n_hidden > 0 and (self.d_hidden is None or self.d_hidden <= 0):
            raise SaekitError(
                f"n_hidden={self.n_hidden} needs d_hidden (the width of the MLP's hidden layers): pass d_hidden="
            )
        resolve_dtype(self.dtype)  # one line for an unknown name

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Lenient: ignore unknown keys, fill missing optional ones with their defaults."""
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("d_in", "n_features") if name not in d]
        if missing:
            raise SaekitError(f"SAE config lacks {', '.join(missing)}: it is not a saekit SAE config")
        return cls(**{key: value for key, value in d.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EncoderOutput(NamedTuple):
    """What `Encoder.forward` returns."""

    codes: torch.Tensor
    """[..., n_features] sparse codes (dense tensor, mostly zeros)."""
    pre_acts: torch.Tensor
    """[..., n_features] pre-activations (linear path + MLP path), before TopK/ReLU; AuxK uses them."""


class ForwardOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns."""

    codes: torch.Tensor
    """[..., n_features] sparse codes (dense tensor, mostly zeros), parameters' dtype."""
    pre_acts: torch.Tensor
    """[..., n_features] encoder pre-activations (before TopK/ReLU), for the AuxK dead-latent loss."""
    reconstruction: torch.Tensor
    """[..., d_in] reconstruction in raw activation space (comparable with the input x)."""
    sae_in: torch.Tensor
    """[..., d_in] the input in the dictionary's normalized space (equals x without normalization)."""
    sae_out: torch.Tensor
    """[..., d_in] the reconstruction in the normalized space: codes @ W_dec + b_dec. Train on
    (sae_out - sae_in) so the loss scale does not depend on the activations' scale."""


class Dictionary(NamedTuple):
    """A dictionary in raw activation space: x ~= codes @ W_dec + b_dec."""

    W_dec: torch.Tensor
    """[n_features, d_in]; rows are unit-norm times input_scale**-1 (exactly unit without normalization)."""
    b_dec: torch.Tensor
    """[d_in]"""


class Normalization(NamedTuple):
    """Input normalization x_n = (x - mean) * scale."""

    mean: torch.Tensor
    """[d_in] subtracted first (zeros when not centering)."""
    scale: float
    """multiplied after centering (1.0 when not scaling)."""


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def _check_k_range(k: float, n_features: int, integer: bool) -> None:
    check_k(k, n_features)
    if integer and float(k) != int(k):
        raise SaekitError(f"k={k} must be a whole number for TopK (Batch-TopK allows a fractional average)")


def topk_activation(pre_acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest pre-activations of each row, ReLU them, zero the rest.

    pre_acts: [..., n] -> codes [..., n] with at most k nonzeros per row.
    """
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
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


def normalization_from_stats(
    mean: torch.Tensor, mean_sq_norm: float, center: bool = True, scale: bool = True
) -> Normalization:
    """Turn the cache's statistics into an input normalization.

    mean: [d_in] mean activation; mean_sq_norm: E||x||^2 of the raw activations.
    Scaling makes E||x_n||^2 = d_in (the sae-lens convention), so hyperparameters transfer across
    layers and models whose activation norms differ by orders of magnitude.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    d_in = mean.numel()
    shift = mean if center else torch.zeros_like(mean)
    # E||x - m||^2 = E||x||^2 - ||m||^2 when m is the mean.
    sq_norm = float(mean_sq_norm) - (float(mean.pow(2).sum()) if center else 0.0)
    if scale and not sq_norm > 0:
        raise SaekitError(
            f"cannot scale inputs: the statistics give E||x - shift||^2 = {sq_norm:.3g} <= 0; check the cache's statistics"
        )
    factor = math.sqrt(d_in / sq_norm) if scale else 1.0
    return Normalization(mean=shift.float(), scale=factor)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """The dictionary: reconstruction = denormalize(codes @ W_dec + b_dec).

    W_dec: [n_features, d_in] with unit-norm rows (kept unit-norm by `normalize_rows_` after each
    optimizer step); b_dec: [d_in]. Buffers `input_mean` [d_in] and `input_scale` [] define the
    normalized space the atoms live in (identity by default).
    """

    def __init__(self, n_features: int, d_in: int, dtype: torch.dtype | str = torch.float32, device: Any = None):
        super().__init__()
        dtype = resolve_dtype(dtype)
        W = torch.empty(n_features, d_in, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(W)
        self.W_dec = nn.Parameter(W)
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        # Statistics stay float32 even for bf16 weights: the mean can be large and must be exact-ish.
        self.register_buffer("input_mean", torch.zeros(d_in, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.normalize_rows_()

    @property
    def n_features(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_out(self) -> int:
        """The original sae-kit name for d_in (the decoder's output width)."""
        return self.d_in

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def trainable(self) -> bool:
        """False freezes W_dec and b_dec (e.g. training a new encoder against a fixed dictionary)."""
        return self.W_dec.requires_grad

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self.W_dec.requires_grad_(value)
        self.b_dec.requires_grad_(value)

    def _stats_dtype(self) -> torch.dtype:
        # Normalize in at least float32 (the mean can be large); float64 weights stay float64.
        return torch.promote_types(self.dtype, torch.float32)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] raw activations -> [..., d_in] in the dictionary's space, parameters' dtype.

        The identity when no normalization is set (exactly: x - 0 and * 1 round-trip any float).
        """
        dt = self._stats_dtype()
        return ((x.to(dt) - self.input_mean.to(dt)) * self.input_scale.to(dt)).to(self.dtype)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """[..., d_in] in the dictionary's space -> raw activation space."""
        dt = self._stats_dtype()
        return (y.to(dt) / self.input_scale.to(dt) + self.input_mean.to(dt)).to(self.dtype)

    def decode_normalized(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_features] -> [..., d_in] reconstruction in the normalized space."""
        _check_last_dim(codes, self.n_features, "codes", "n_features")
        return codes.to(self.dtype) @ self.W_dec + self.b_dec

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., n_features] -> [..., d_in] reconstruction in raw activation space."""
        return self.denormalize(self.decode_normalized(codes))

    forward = decode

    def raw_dictionary(self) -> Dictionary:
        """The atoms in raw activation space: pursuit against them gives codes that `decode` accepts.

        Equals (W_dec, b_dec) without normalization. With it, rows have norm 1/input_scale; a uniform
        scale changes neither which atoms a pursuit picks nor the reconstruction.
        """
        dt = self._stats_dtype()
        scale, mean = self.input_scale.to(dt), self.input_mean.to(dt)
        return Dictionary((self.W_dec.to(dt) / scale).to(self.dtype), (self.b_dec.to(dt) / scale + mean).to(self.dtype))

    @torch.no_grad()
    def set_normalization_(self, mean: torch.Tensor, scale: float) -> None:
        """Set x_n = (x - mean) * scale. Do this before training: it changes what the atoms mean."""
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).reshape(self.d_in))
        self.input_scale.fill_(float(scale))

    @torch.no_grad()
    def normalize_rows_(self) -> None:
        """Rescale each atom (row of W_dec) to unit norm; call after every optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out of W_dec.grad its component along each atom, before the optimizer step.

        For unit-norm rows the parallel component only changes the norm, which `normalize_rows_`
        would undo anyway; removing it keeps Adam's statistics for the direction that matters.
        """
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * unit).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * unit)


def _check_last_dim(t: torch.Tensor, expected: int, what: str, name: str) -> None:
    if t.dim() == 0 or t.shape[-1] != expected:
        got = "a scalar" if t.dim() == 0 else f"last dimension {t.shape[-1]}"
        raise SaekitError(f"{what} have {got} but this SAE expects {name}={expected}: pass [..., {expected}] tensors")


class Encoder(nn.Module):
    """codes = activation(x @ W_enc + b_enc + mlp(x)), where x is already normalized and, when
    `apply_preencoder_bias`, has the decoder's b_dec subtracted (the SAE passes b_dec in).

    W_enc: [d_in, n_features], b_enc: [n_features]. The optional MLP path (n_hidden layers of width
    d_hidden, ReLU) ends in a zero-initialized layer, so a fresh MLP encoder computes exactly its
    linear path: the "skip connection" init that starts fine-tuning from a pretrained encoder.
    `threshold` [n_features] is the JumpReLU threshold, or Batch-TopK's running threshold (NaN until
    first estimated in training); unused by TopK and ReLU.
    """

    def __init__(
        self,
        d_in: int,
        n_features: int,
        k: float | None = None,
        d_hidden: int | None = None,
        n_hidden: int = 0,
        apply_preencoder_bias: bool = True,
        dtype: torch.dtype | str = torch.float32,
        device: Any = None,
        *,
        activation: str | None = None,
        threshold_lr: float = 0.01,
    ):
        super().__init__()
        dtype = resolve_dtype(dtype)
        if activation is None:
            activation = "topk" if k is not None else "relu"
        cfg = SAEConfig(
            d_in=d_in,
            n_features=n_features,
            activation=activation,
            k=k,
            d_hidden=d_hidden,
            n_hidden=n_hidden,
            apply_preencoder_bias=apply_preencoder_bias,
            threshold_lr=threshold_lr,
            dtype=dtype_name(dtype),
        )
        self.activation = cfg.activation
        self.k = cfg.k
        self.apply_preencoder_bias = cfg.apply_preencoder_bias
        self.threshold_lr = cfg.threshold_lr
        self.d_hidden = cfg.d_hidden if cfg.n_hidden > 0 else None
        self.n_hidden = cfg.n_hidden

        W = torch.empty(d_in, n_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(W)
        self.W_enc = nn.Parameter(W)
        self.b_enc = nn.Parameter(torch.zeros(n_features, dtype=dtype, device=device))
        fill = math.nan if self.activation == "batchtopk" else 0.0
        self.register_buffer("threshold", torch.full((n_features,), fill, dtype=dtype, device=device))
        self.mlp = _mlp_path(d_in, n_features, cfg.d_hidden, cfg.n_hidden, dtype, device) if cfg.n_hidden > 0 else None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def trainable(self) -> bool:
        """False freezes every encoder parameter (linear and MLP path)."""
        return self.W_enc.requires_grad

    @trainable.setter
    def trainable(self, value: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(value)

    def pre_activations(self, x: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
        """x: [..., d_in] normalized input; b_dec: [d_in] the decoder's bias -> [..., n_features]."""
        if self.apply_preencoder_bias and b_dec is not None:
            x = x - b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.mlp is not None:
            pre = pre + self.mlp(x)
        return pre

    def activate(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """pre_acts [..., n_features] -> codes [..., n_features], per `self.activation`."""
        if self.activation == "topk":
            return topk_activation(pre_acts, int(self.k))
        if self.activation == "relu":
            return pre_acts.relu()
        if self.activation == "jumprelu":
            return jumprelu_activation(pre_acts, self.threshold)
        # Batch-TopK: batch-level selection while training; at inference the running threshold
        # makes each token's code independent of its batch (and a fresh SAE falls back to batches).
        if self.training or bool(self.threshold.isnan().any()):
            return batch_topk_activation(pre_acts, self.k)
        return jumprelu_activation(pre_acts, self.threshold)

    @torch.no_grad()
    def update_threshold_(self, codes: torch.Tensor) -> None:
        """Batch-TopK: move the running threshold toward this batch's smallest kept activation."""
        kept = codes[codes > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        if bool(self.threshold.isnan().any()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest.expand_as(self.threshold), self.threshold_lr)

    def forward(self, x: torch.Tensor, b_dec: torch.Tensor | None = None) -> EncoderOutput:
        pre = self.pre_activations(x, b_dec)
        codes = self.activate(pre)
        if self.activation == "batchtopk" and self.training:
            self.update_threshold_(codes)
        return EncoderOutput(codes, pre)


def _mlp_path(
    d_in: int, n_features: int, d_hidden: int, n_hidden: int, dtype: torch.dtype, device: Any
) -> nn.Sequential:
    widths = [d_in] + [d_hidden] * n_hidden
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, dtype=dtype, device=device), nn.ReLU()]
    last = nn.Linear(d_hidden, n_features, dtype=dtype, device=device)
    # Zero output layer: the MLP path adds nothing until trained, so the encoder starts as its linear
    # path. Its weight still gets gradient (hidden activations are nonzero), so it learns.
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# The SAE
# --------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """An `Encoder` and a `Decoder`.

    Build it from sizes, from a decoder (a new encoder over an existing dictionary), or from an
    encoder and a decoder:

        SparseAutoencoder(d_in=768, n_features=24576, k=32)
        SparseAutoencoder(decoder=pretrained.decoder, k=100, d_hidden=1024, n_hidden=2, device="cuda")
        SparseAutoencoder(encoder=enc, decoder=dec)

    A new encoder's linear path starts as the decoder's transpose; an MLP path starts at zero.
    `activation` defaults to 'topk' when k is given; pass 'batchtopk' or 'relu' otherwise.
    `normalize_activations` is the original sae-kit's argument: False (its default) is accepted,
    True raises (see `set_input_normalization`).
    """

    def __init__(
        self,
        d_in: int | None = None,
        n_features: int | None = None,
        k: float | None = None,
        d_hidden: int | None = None,
        n_hidden: int = 0,
        apply_preencoder_bias: bool = True,
        dtype: torch.dtype | str | None = None,
        device: Any = None,
        encoder: Encoder | None = None,
        decoder: Decoder | None = None,
        normalize_activations: bool = False,
        *,
        activation: str | None = None,
        threshold_lr: float = 0.01,
        metadata: dict | None = None,
    ):
        super().__init__()
        if normalize_activations:
            raise SaekitError(
                "normalize_activations=True (the original sae-kit's per-token rescaling in forward) is not supported: "
                "saekit normalizes with the activation cache's statistics; call sae.set_input_normalization(mean, mean_sq_norm), "
                "as saekit train --normalize does"
            )
        self.metadata: dict = dict(metadata or {})
        if encoder is not None:
            if k is not None or activation is not None or d_hidden is not None or n_hidden:
                raise SaekitError(
                    "k, activation, d_hidden and n_hidden describe a new encoder, but you passed one: drop them or drop encoder="
                )
            if decoder is None:
                decoder = _decoder_from_encoder(encoder)
            _check_encoder_fits_decoder(encoder, decoder, d_in, n_features)
        else:
            if decoder is None:
                if d_in is None or n_features is None:
                    raise SaekitError("give d_in and n_features (and k), or a decoder=, or an encoder= and decoder=")
                decoder = Decoder(n_features, d_in, dtype=resolve_dtype(dtype), device=device)
            else:
                _check_encoder_fits_decoder(None, decoder, d_in, n_features)
            if activation is None and k is None:
                raise SaekitError("a new encoder needs k (TopK), or activation='relu' / 'batchtopk' with k")
            encoder = Encoder(
                decoder.d_in,
                decoder.n_features,
                k,
                d_hidden,
                n_hidden,
                apply_preencoder_bias,
                dtype=decoder.dtype,
                device=decoder.device,
                activation=activation,
                threshold_lr=threshold_lr,
            )
            with torch.no_grad():
                encoder.W_enc.copy_(decoder.W_dec.T)
        if device is not None:
            decoder.to(device)
            encoder.to(device)
        self.encoder = encoder
        self.decoder = decoder

    # ---- the original sae-kit attributes, read from the modules so they never go stale ----
    @property
    def d_in(self) -> int:
        return self.decoder.d_in

    @property
    def n_features(self) -> int:
        return self.decoder.n_features

    @property
    def k(self) -> float | None:
        return self.encoder.k

    @property
    def activation(self) -> str:
        return self.encoder.activation

    @property
    def d_hidden(self) -> int | None:
        return self.encoder.d_hidden

    @property
    def n_hidden(self) -> int:
        return self.encoder.n_hidden

    @property
    def apply_preencoder_bias(self) -> bool:
        return self.encoder.apply_preencoder_bias

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def config(self) -> SAEConfig:
        return SAEConfig(
            d_in=self.d_in,
            n_features=self.n_features,
            activation=self.activation,
            k=self.k,
            d_hidden=self.d_hidden,
            n_hidden=self.n_hidden,
            apply_preencoder_bias=self.apply_preencoder_bias,
            threshold_lr=self.encoder.threshold_lr,
            dtype=dtype_name(self.dtype),
            metadata=dict(self.metadata),
        )

    @classmethod
    def from_config(cls, cfg: SAEConfig, device: Any = None) -> SparseAutoencoder:
        return cls(
            cfg.d_in,
            cfg.n_features,
            cfg.k,
            cfg.d_hidden,
            cfg.n_hidden,
            cfg.apply_preencoder_bias,
            dtype=cfg.dtype,
            device=device,
            activation=cfg.activation,
            threshold_lr=cfg.threshold_lr,
            metadata=cfg.metadata,
        )

    # ---- computation ----
    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """x: [..., d_in] raw activations -> ForwardOutput (codes, pre_acts, reconstruction, sae_in, sae_out)."""
        _check_last_dim(x, self.d_in, "inputs", "d_in")
        sae_in = self.decoder.normalize(x)
        codes, pre = self.encoder(sae_in, self.decoder.b_dec)
        sae_out = self.decoder.decode_normalized(codes)
        recon = self.decoder.denormalize(sae_out)
        return ForwardOutput(codes, pre, recon, sae_in, sae_out)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] raw activations -> codes [..., n_features] (dense, mostly zeros)."""
        _check_last_dim(x, self.d_in, "inputs", "d_in")
        return self.encoder(self.decoder.normalize(x), self.decoder.b_dec).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [..., n_features] -> [..., d_in] reconstruction in raw activation space."""
        return self.decoder.decode(codes)

    @torch.no_grad()
    def calibrate_threshold_(self, x: torch.Tensor) -> float:
        """Batch-TopK: set the inference threshold so that the rows x [rows, d_in] (raw activations)
        keep k latents each on average, as batch-level selection does; returns the threshold.

        It sits halfway between the (k·rows)-th and the next largest positive pre-activation. This
        replaces the running estimate, which trails behind the encoder in short runs.
        """
        if self.activation != "batchtopk":
            raise SaekitError(f"only Batch-TopK SAEs have a threshold to calibrate; this one is {self.activation}")
        _check_last_dim(x, self.d_in, "inputs", "d_in")
        pre = self.encoder.pre_activations(self.decoder.normalize(x), self.decoder.b_dec).relu().flatten()
        m = int(self.k * x.shape[0])
        if not 0 < m < pre.numel():
            raise SaekitError(f"calibrating k={self.k} needs more than {x.shape[0]} rows; pass more rows")
        top = pre.float().topk(m + 1).values  # sorted, largest first
        threshold = float(top[m - 1] + top[m]) / 2
        self.encoder.threshold.fill_(threshold)
        return threshold

    def set_input_normalization(
        self, mean: torch.Tensor, mean_sq_norm: float, center: bool = True, scale: bool = True
    ) -> Normalization:
        """Center and/or scale inputs from the cache's statistics (mean [d_in], E||x||^2).

        Call it on a fresh SAE before training; it is stored in the decoder's buffers, kept by
        `save`, and folded into the weights by `export_sae_lens`.
        """
        norm = normalization_from_stats(mean, mean_sq_norm, center=center, scale=scale)
        if norm.mean.numel() != self.d_in:
            raise SaekitError(
                f"the statistics' mean has {norm.mean.numel()} entries but this SAE expects d_in={self.d_in}"
            )
        self.decoder.set_normalization_(norm.mean, norm.scale)
        return norm

    # ---- persistence ----
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `path/` with `sae.safetensors` and `config.json`. Refuses a non-empty `path` unless
        overwrite=True; the directory appears complete or not at all (written aside, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.config.to_dict()}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

        publish_dir(path, write, overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "cpu") -> SparseAutoencoder:
        """Load a directory written by `save` (safetensors only: nothing is unpickled). Returns eval mode.

        For any kind of SAE (a run dir, a sae-lens dir or release) use `load_sae`.
        """
        path = Path(path)
        cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_file.is_file():
            if (path / SAE_LENS_CONFIG).is_file():
                raise SaekitError(
                    f"{path} holds a sae-lens SAE, not a saekit one: use SparseAutoencoder.from_pretrained('{path}')"
                )
            raise SaekitError(
                f"{path} is not a saved saekit SAE (needs {CONFIG_FILE} and {WEIGHTS_FILE}): check the path"
            )
        if not weights_file.is_file():
            raise SaekitError(
                f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}: the weights file is missing; copy it next to {CONFIG_FILE} or re-save the SAE"
            )
        cfg = SAEConfig.from_dict(read_json_object(cfg_file, "a saekit SAE config"))
        sae = cls.from_config(cfg, device="meta")
        state = _read_weights(weights_file, device)
        expected = sae.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise SaekitError(
                f"{weights_file} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: it does not match {CONFIG_FILE}"
            )
        for key, t in expected.items():
            if state[key].shape != t.shape:
                raise SaekitError(
                    f"{weights_file} has {key} of shape {list(state[key].shape)} but {CONFIG_FILE} says {list(t.shape)}: "
                    "the two files belong to different SAEs; re-save the SAE"
                )
        # assign=True adopts the loaded tensors (no second copy on the device); unknown keys ignored.
        sae.load_state_dict({k: v for k, v in state.items() if k in expected}, assign=True)
        return sae.eval()

    # ---- sae-lens (implemented in saekit.sae_lens_io, imported on use: it imports this module) ----
    @classmethod
    def from_pretrained(
        cls,
        release: str | os.PathLike,
        sae_id: str | None = None,
        device: Any = "cpu",
        k: int | None = None,
        d_hidden: int | None = None,
        n_hidden: int = 0,
    ) -> SparseAutoencoder:
        """Load a sae-lens SAE: a hub release + id (through `sae_lens.SAE.from_pretrained`), or a local
        directory holding `cfg.json` + `sae_weights.safetensors` (`release`, or `release/sae_id`).

        Standard (ReLU), TopK, Batch-TopK and JumpReLU SAEs keep their native activation; `k`
        replaces it with TopK(k). `d_hidden`/`n_hidden` add a zero-initialized MLP path. See
        `from_sae_lens` for how decoder norms are handled. Returns the SAE in eval mode.
        """
        from saekit import sae_lens_io

        return sae_lens_io.load_pretrained(release, sae_id, device, k=k, d_hidden=d_hidden, n_hidden=n_hidden)

    @classmethod
    def from_sae_lens(
        cls, sl: Any, k: int | None = None, d_hidden: int | None = None, n_hidden: int = 0, device: Any = None
    ) -> SparseAutoencoder:
        """Convert an in-memory sae-lens SAE (standard, topk, batchtopk, jumprelu).

        saekit keeps decoder rows unit-norm, so row norms n_i are folded into the encoder
        (W_enc[:, i] *= n_i, b_enc[i] *= n_i, thresholds *= n_i): reconstructions are unchanged.
        SAEs trained with `rescale_acts_by_decoder_norm` (sae-lens TopK/Batch-TopK training) already
        measure codes this way, so their codes are identical too; for the others saekit's code i is
        sae-lens's times n_i (ReLU and JumpReLU are exact under this). A TopK SAE without that flag
        ranks latents by the rescaled pre-activations, which can change its selection when row norms
        differ: a warning says so.
        """
        from saekit import sae_lens_io

        return sae_lens_io.from_sae_lens(sl, k=k, d_hidden=d_hidden, n_hidden=n_hidden, device=device)

    def export_sae_lens(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a directory that `sae_lens.SAE.load_from_disk(path)` opens with the same encode and
        decode outputs on raw activations (input normalization is folded into the weights).

        TopK -> sae-lens 'topk'; ReLU -> 'standard'; JumpReLU and Batch-TopK (its inference
        threshold) -> 'jumprelu'. MLP encoders have no sae-lens counterpart.
        """
        from saekit import sae_lens_io

        return sae_lens_io.export_sae_lens(self, path, overwrite)


def _check_encoder_fits_decoder(
    encoder: Encoder | None, decoder: Decoder, d_in: int | None, n_features: int | None
) -> None:
    if encoder is not None and encoder.d_in != decoder.d_in:
        raise SaekitError(
            f"encoder d_in={encoder.d_in} does not match decoder d_in={decoder.d_in}: they must read the same activations"
        )
    if encoder is not None and encoder.n_features != decoder.n_features:
        raise SaekitError(
            f"encoder n_features={encoder.n_features} does not match decoder n_features={decoder.n_features}"
        )
    if d_in is not None and d_in != decoder.d_in:
        raise SaekitError(
            f"d_in={d_in} does not match the decoder's d_in={decoder.d_in}: drop d_in= or pass a matching decoder"
        )
    if n_features is not None and n_features != decoder.n_features:
        raise SaekitError(f"n_features={n_features} does not match the decoder's n_features={decoder.n_features}")


def _decoder_from_encoder(encoder: Encoder) -> Decoder:
    decoder = Decoder(encoder.n_features, encoder.d_in, dtype=encoder.W_enc.dtype, device=encoder.W_enc.device)
    with torch.no_grad():
        decoder.W_dec.copy_(encoder.W_enc.T)
    decoder.normalize_rows_()
    return decoder


def publish_dir(path: Path, write: Any, overwrite: bool) -> None:
    """Write a directory aside with `write(tmp)` and rename it into place (never half-written)."""
    if is_non_empty(path) and not overwrite:
        raise SaekitError(f"{path} already exists and is not empty: choose a new path or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Files, and the one loader for every kind of SAE
# --------------------------------------------------------------------------------------------


def read_json_object(file: Path, what: str) -> dict:
    """The JSON object in `file`; anything else is one SaekitError line naming the file."""
    try:
        raw = json.loads(file.read_bytes())
    except json.JSONDecodeError as e:
        raise SaekitError(f"{file} is not valid JSON ({e.msg}, line {e.lineno}): re-save the SAE") from None
    except ValueError:  # bytes that are not text at all
        raise SaekitError(f"{file} is not valid JSON (it is not text): re-save the SAE") from None
    except OSError as e:
        raise SaekitError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise SaekitError(f"{file} is not {what} (a JSON object is expected): re-save the SAE")
    return raw


def _read_weights(file: Path, device: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on `device`; a damaged or unreadable file is one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=str(torch.device(device)))
    except SafetensorError as e:
        raise SaekitError(f"{file} is damaged ({one_line(e)}): re-save the SAE or copy the file again") from None
    except OSError as e:
        raise SaekitError(f"cannot read {file}: {e.strerror}") from None


def load_sae(spec: str | os.PathLike, device: Any = "cpu") -> SparseAutoencoder:
    """An SAE, in eval mode, from any of: a saekit training run dir (the SAE in its sae/), a saekit
    SAE dir (config.json + sae.safetensors), a local sae-lens dir (cfg.json +
    sae_weights.safetensors), or a sae-lens hub RELEASE/ID.

    `~` is expanded. A spec that names the local filesystem but is not a directory is an error,
    not a hub lookup. Every failure is one SaekitError line.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_sae_dir(path, device)
    if _looks_local(text):
        if path.exists():
            raise SaekitError(
                f"{text} is a file; pass the directory that holds the SAE (a run dir, a saekit or sae-lens SAE dir) or RELEASE/ID"
            )
        raise SaekitError(f"no SAE directory at {text}; pass a run dir, a saekit or sae-lens SAE dir, or RELEASE/ID")
    release, _, sae_id = text.partition("/")
    return SparseAutoencoder.from_pretrained(release, sae_id or None, device=device)


def check_sae_fits_hook(sae: SparseAutoencoder, spec: str, d_model: int, hook: str) -> None:
    """One line when `sae` (given as `spec`) cannot read a store's `hook` of width d_model; a
    warning when its metadata says it was trained on another hook."""
    if sae.d_in != d_model:
        raise SaekitError(
            f"SAE {spec} has d_in={sae.d_in} but hook {hook} of the store has d_model={d_model}; use an SAE trained on this hook"
        )
    meant = sae.metadata.get("hook_name") if isinstance(sae.metadata, dict) else None
    if meant and meant != hook:
        warnings.warn(f"SAE {spec} was trained on {meant}, not {hook}; the comparison may be meaningless", stacklevel=3)


def encoder_k(sae: SparseAutoencoder) -> float | None:
    """The k a report shows for an SAE's encoder: TopK's k, Batch-TopK's average; None for ReLU and JumpReLU."""
    return sae.k if sae.activation in ("topk", "batchtopk") else None


def _load_sae_dir(path: Path, device: Any) -> SparseAutoencoder:
    if (path / "sae").is_dir():
        path = path / "sae"  # a training run directory (its own config.json is the training config)
    saekit_cfg, lens_cfg = (path / CONFIG_FILE).is_file(), (path / SAE_LENS_CONFIG).is_file()
    if saekit_cfg and (
        not lens_cfg or read_json_object(path / CONFIG_FILE, "an SAE config").get("format") == FORMAT_NAME
    ):
        return SparseAutoencoder.load(path, device=device)
    if lens_cfg:
        return SparseAutoencoder.from_pretrained(path, None, device=device)
    raise SaekitError(
        f"no SAE in {path}: expected a saekit SAE ({CONFIG_FILE} + {WEIGHTS_FILE}), a sae-lens one "
        f"({SAE_LENS_CONFIG} + {SAE_LENS_WEIGHTS}), or a training run dir with sae/"
    )


def _looks_local(spec: str) -> bool:
    """True for specs that name the local filesystem rather than a sae-lens RELEASE/ID."""
    first = spec.split("/", 1)[0]
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or (bool(first) and Path(first).is_dir())

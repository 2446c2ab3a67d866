"""The parts a SparseAutoencoder is made of: its config, the activation functions (TopK,
Batch-TopK, ReLU, JumpReLU), input normalization, the `Encoder` and the `Decoder` (the dictionary).

Shapes: `x` is `[..., d_in]`, codes are dense `[..., n_features]` in the parameters' dtype.
The dictionary lives in a normalized space `x_n = (x - input_mean) * input_scale`; both buffers
sit on the `Decoder` (see saekit/sae/model.py's docstring).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from saekit.config import check_non_negative
from saekit.devices import dtype_name, resolve_dtype
from saekit.errors import SaekitError
from saekit.pursuit import decode_sparse
from saekit.sae.architectures import ACTIVATIONS as ACTIVATIONS
from saekit.sae.architectures import architecture
from saekit.sae.architectures import batch_topk_activation as batch_topk_activation
from saekit.sae.architectures import jumprelu_activation as jumprelu_activation
from saekit.sae.architectures import topk_activation as topk_activation

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
    n_unroll: int = 0
    """Learned pursuit-like refinement steps after the TopK encoder (`unroll_step`); 0: none. TopK only."""
    apply_preencoder_bias: bool = True
    """Subtract the decoder's b_dec from the input before encoding (sae-lens `apply_b_dec_to_input`)."""
    threshold_lr: float = 0.01
    """Batch-TopK: rate of the running (exponential) average of the smallest kept activation."""
    rank_scale: bool = False
    """TopK: the encoder picks its k latents by pre-activation x a per-latent `rank_scale` buffer
    instead of by pre-activation (a sae-lens TopK SAE whose decoder rows have unequal norms ranks
    by its own pre-activations; saekit's unit-norm atoms fold the norms into them)."""
    dtype: str = "float32"
    """Parameter dtype: 'float32', 'float64', 'bfloat16' or 'float16' (or an alias in saekit.devices.DTYPES)."""
    metadata: dict = field(default_factory=dict)
    """Free-form provenance kept through save/load/export (e.g. model_name, hook_name, source)."""

    def __post_init__(self) -> None:
        arch = architecture(self.activation)
        if self.d_in <= 0 or self.n_features <= 0:
            raise SaekitError(f"d_in={self.d_in} and n_features={self.n_features} must both be positive")
        self.k = arch.check_k(self.k, self.n_features)
        check_non_negative("n_hidden", self.n_hidden, "no MLP path")
        if self.n_hidden > 0 and (self.d_hidden is None or self.d_hidden <= 0):
            raise SaekitError(
                f"n_hidden={self.n_hidden} needs d_hidden (the width of the MLP's hidden layers): pass d_hidden="
            )
        check_non_negative("n_unroll", self.n_unroll, "no refinement steps")
        if self.rank_scale and (not arch.fixed_k or self.n_unroll):
            raise SaekitError("rank_scale applies to a TopK encoder without refinement steps (n_unroll=0)")
        if self.n_unroll and not arch.fixed_k:
            raise SaekitError(
                f"n_unroll={self.n_unroll} refines TopK codes, but the activation is {self.activation!r}: use 'topk' or n_unroll=0"
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


class TopKCodes(NamedTuple):
    """A TopK encoder's codes in sparse form (what `Encoder.topk_codes` returns)."""

    indices: torch.Tensor
    """[..., k] int64 chosen latents."""
    values: torch.Tensor
    """[..., k] their codes, all >= 0."""
    pre_acts: torch.Tensor
    """[..., n_features] the pre-activations the last TopK chose from."""


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


def unroll_step(
    x: torch.Tensor,
    codes: TopKCodes,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    step: torch.Tensor,
    bias: torch.Tensor,
    k: int,
) -> TopKCodes:
    """One learned refinement of TopK codes, a LISTA-style step of normalized iterative hard
    thresholding: residual -> correlation c with every atom -> z + mu * step * c + bias -> TopK(ReLU).

    x: [b, d] normalized input; codes: indices/values [b, k]; W_dec: [n, d]; b_dec: [d] or None;
    step, bias: [n] learned -> codes [b, k] with pre_acts [b, n].

    mu is each row's exact line search along the gradient restricted to the current support S,
    ||c_S||^2 / ||c_S D_S||^2 (Blumensath & Davies 2010, as gradient pursuit steps). A fixed
    step (e.g. 1/||D_j||^2, plain IHT) diverges from a fresh encoder, whose codes overshoot: it
    is stable only below 1/||D||^2 over the k chosen atoms, which depends on the row. So a fresh
    step (step 1, bias 0) is a step that lowers the error on S, then a projection onto k-sparse
    nonnegative codes; training learns per-latent corrections. Cost: the correlation, one matmul
    of W_dec's size; the rest decodes only the k chosen atoms (`decode_sparse`).
    """
    residual = x - decode_sparse(codes.indices, codes.values, W_dec, b_dec)
    corr = residual @ W_dec.T
    grad_s = corr.gather(-1, codes.indices)
    image = decode_sparse(codes.indices, grad_s, W_dec)
    mu = grad_s.pow(2).sum(-1, keepdim=True) / image.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    z = torch.zeros_like(corr).scatter(-1, codes.indices, codes.values)
    pre = z + mu * step * corr + bias
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return TopKCodes(indices, values.relu(), pre)


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

    input_mean: torch.Tensor  # buffers (registered in __init__)
    input_scale: torch.Tensor

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
        check_last_dim(codes, self.n_features, "codes", "n_features")
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


def check_last_dim(t: torch.Tensor, expected: int, what: str, name: str) -> None:
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

    `n_unroll` = T > 0 (TopK only) refines the codes with T learned steps against the decoder's
    dictionary (`unroll_step`; so forward needs W_dec): `unroll_step_size` [T, n_features], a
    factor on each row's line-search step, starts at 1 (a plain normalized-IHT step),
    `unroll_bias` [T, n_features] at 0. T = 0 registers neither: the encoder is exactly as before.
    """

    threshold: torch.Tensor  # a buffer, or JumpReLU's parameter (registered in `_build`)
    rank_scale: torch.Tensor | None
    k: float | None
    d_hidden: int | None

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
        n_unroll: int = 0,
    ):
        super().__init__()
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
            dtype=dtype_name(resolve_dtype(dtype)),
            n_unroll=n_unroll,
        )
        self._build(cfg, device)

    @classmethod
    def from_config(cls, cfg: SAEConfig, device: Any = None) -> Encoder:
        """A new encoder as `cfg` says (its metadata aside), on `device`."""
        enc = cls.__new__(cls)
        nn.Module.__init__(enc)
        enc._build(cfg, device)
        return enc

    def _build(self, cfg: SAEConfig, device: Any) -> None:
        dtype = resolve_dtype(cfg.dtype)
        d_in, n_features = cfg.d_in, cfg.n_features
        self._config = replace(cfg, metadata={})
        self.activation = cfg.activation
        self.arch = architecture(cfg.activation)
        self.k = cfg.k
        self.apply_preencoder_bias = cfg.apply_preencoder_bias
        self.threshold_lr = cfg.threshold_lr
        self.d_hidden = cfg.d_hidden if cfg.n_hidden > 0 else None
        self.n_hidden = cfg.n_hidden

        W = torch.empty(d_in, n_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(W)
        self.W_enc = nn.Parameter(W)
        self.b_enc = nn.Parameter(torch.zeros(n_features, dtype=dtype, device=device))
        threshold = torch.full((n_features,), self.arch.initial_threshold(), dtype=dtype, device=device)
        if self.arch.learns_threshold:  # trained with the weights (saekit.train.jumprelu)
            self.threshold = nn.Parameter(threshold)
        else:
            self.register_buffer("threshold", threshold)
        self.mlp = (
            _mlp_path(d_in, n_features, cfg.d_hidden, cfg.n_hidden, dtype, device)
            if cfg.n_hidden > 0 and cfg.d_hidden
            else None
        )
        self.n_unroll = cfg.n_unroll
        self.register_buffer("rank_scale", None)  # TopK's ranking scale: `set_rank_scale_`
        if self.n_unroll:  # registered only when used: T = 0 keeps the state dict of older SAEs
            shape = (self.n_unroll, n_features)
            self.unroll_step_size = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
            self.unroll_bias = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if cfg.rank_scale:  # its values come with the weights
            self.set_rank_scale_(torch.ones(n_features, device=device))

    @property
    def config(self) -> SAEConfig:
        """What it was built from (no metadata: that is the SAE's), in its current dtype."""
        return replace(self._config, rank_scale=self.rank_scale is not None, dtype=dtype_name(self.W_enc.dtype))

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

    def set_rank_scale_(self, scale: torch.Tensor) -> None:
        """TopK: pick the k latents by pre-activation x `scale` [n_features] from now on (kept in the
        state dict). A sae-lens TopK SAE with unequal decoder row norms n_i ranks by its own
        pre-activations, which are saekit's divided by n_i: scale = 1 / n_i."""
        SAEConfig(self.d_in, self.n_features, self.activation, self.k, n_unroll=self.n_unroll, rank_scale=True)
        self.rank_scale = scale.detach().to(self.W_enc.dtype).to(self.W_enc.device).clone()

    @property
    def k_per_row(self) -> int:
        """k of an encoder with exactly k codes per row (TopK)."""
        assert self.k is not None and self.arch.fixed_k, "only an encoder with exactly k codes per row has k_per_row"
        return int(self.k)

    def rank_key(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """What TopK ranks latents by: the pre-activations, times `rank_scale` where it is set."""
        return pre_acts if self.rank_scale is None else pre_acts * self.rank_scale

    def pre_activations(self, x: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
        """x: [..., d_in] normalized input; b_dec: [d_in] the decoder's bias -> [..., n_features]."""
        if self.apply_preencoder_bias and b_dec is not None:
            x = x - b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.mlp is not None:
            pre = pre + self.mlp(x)
        return pre

    def topk_codes(self, x: torch.Tensor, b_dec: torch.Tensor | None, W_dec: torch.Tensor | None = None) -> TopKCodes:
        """TopK only: the k latents of each row and their codes, after the `n_unroll` refinement steps.

        x: [b, d_in] normalized input; b_dec: [d_in]; W_dec: [n_features, d_in] the dictionary
        (needed when n_unroll > 0) -> indices/values [b, k], pre_acts [b, n_features].
        """
        pre = self.pre_activations(x, b_dec)
        indices = self.rank_key(pre).topk(self.k_per_row, dim=-1, sorted=False).indices
        codes = TopKCodes(indices, pre.gather(-1, indices).relu(), pre)
        if not self.n_unroll:
            return codes
        if W_dec is None:
            raise SaekitError(
                "this encoder refines its codes against the dictionary (n_unroll > 0): pass W_dec, or use SparseAutoencoder.encode"
            )
        for t in range(self.n_unroll):
            codes = unroll_step(x, codes, W_dec, b_dec, self.unroll_step_size[t], self.unroll_bias[t], self.k_per_row)
        return codes

    def activate(self, pre_acts: torch.Tensor) -> torch.Tensor:
        """pre_acts [..., n_features] -> codes [..., n_features], per the architecture (`self.arch`)."""
        if self.rank_scale is not None:  # a sae-lens TopK SAE's own ranking (`set_rank_scale_`)
            return topk_activation(pre_acts, self.k_per_row, self.rank_key(pre_acts))
        return self.arch.activate(pre_acts, self.k, self.threshold, self.training)

    @torch.no_grad()
    def update_threshold_(self, codes: torch.Tensor) -> None:
        """An architecture that calibrates (Batch-TopK): move the running threshold toward this
        batch's smallest kept activation."""
        kept = codes[codes > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        if bool(self.threshold.isnan().any()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest.expand_as(self.threshold), self.threshold_lr)

    def forward(
        self, x: torch.Tensor, b_dec: torch.Tensor | None = None, W_dec: torch.Tensor | None = None
    ) -> EncoderOutput:
        """x: [..., d_in] normalized input; b_dec: [d_in]; W_dec: [n_features, d_in], used only
        by the refinement steps (n_unroll > 0)."""
        if self.n_unroll:
            sel = self.topk_codes(x, b_dec, W_dec)
            return EncoderOutput(torch.zeros_like(sel.pre_acts).scatter_(-1, sel.indices, sel.values), sel.pre_acts)
        pre = self.pre_activations(x, b_dec)
        codes = self.activate(pre)
        if self.arch.calibrates and self.training:
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

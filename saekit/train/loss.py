"""The loss of one training batch: the codes it decodes and how it is measured.

Codes come from the encoder (TopK decodes only the k chosen atoms through `decode_sparse`, plus
OpenAI's AuxK loss on dead latents), from gradient pursuit against the current dictionary (no
grad to the codes, grad to the dictionary), or both. Distillation adds a term that pulls the
encoder toward gradient pursuit's codes of the same rows (`distill_loss`). Losses are squared
errors in the dictionary's normalized space divided by the store's variance there, so they read
as FVUs.
`saekit.train` runs the loop around `Objective`.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

from saekit.errors import SaekitError
from saekit.pursuit import SparseCodes, decode_sparse, gradient_pursuit, to_dense
from saekit.sae import SparseAutoencoder
from saekit.train.jumprelu import JumpReLUTraining, jumprelu_codes, pre_act_loss, sparsity_loss

# Set SAEKIT_DENSE_DECODE=1 to decode TopK codes with a dense [b, n] @ [n, d] matmul instead of
# gathering the k chosen atoms (the eager reference path; same math, slower for k << n).
DENSE_DECODE = os.environ.get("SAEKIT_DENSE_DECODE", "") not in ("", "0")


class Encoded(NamedTuple):
    """The encoder's codes for a batch, as the loss needs them."""

    sae_out: Tensor  # [b, d] reconstruction in the normalized space
    pre_acts: Tensor  # [b, n] pre-activations (AuxK picks dead latents from them)
    counts: Tensor  # [n] tokens on which each latent fired
    codes: Tensor | None  # [b, n] dense codes where the path computed them (not TopK's sparse one)


def encode_decode(sae: SparseAutoencoder, sae_in: Tensor) -> Encoded:
    """Encode normalized inputs [b, d] and decode them; TopK decodes only the chosen atoms."""
    enc, dec = sae.encoder, sae.decoder
    if enc.arch.fixed_k and not DENSE_DECODE:
        indices, values, pre = enc.topk_codes(sae_in, dec.b_dec, dec.W_dec)
        counts = firing_counts(indices, values, dec.n_features, pre.dtype)
        return Encoded(decode_sparse(indices, values, dec.W_dec, dec.b_dec), pre, counts, None)
    codes, pre = enc(sae_in, dec.b_dec, dec.W_dec)  # Batch-TopK also updates its inference threshold here
    return Encoded(dec.decode_normalized(codes), pre, (codes > 0).sum(0).to(pre.dtype), codes)


def jumprelu_encode_decode(sae: SparseAutoencoder, sae_in: Tensor, spec: JumpReLUTraining) -> Encoded:
    """A JumpReLU SAE's codes of normalized inputs [b, d], with the straight-through estimators'
    gradient to its thresholds (`saekit.train.jumprelu`), and their reconstruction."""
    enc, dec = sae.encoder, sae.decoder
    with torch.no_grad():  # thresholds stay >= 0 (sae-lens projects them so); a clamp in the graph would pin them at 0
        enc.threshold.clamp_(min=0.0)
    pre = enc.pre_activations(sae_in, dec.b_dec)
    codes = jumprelu_codes(pre, enc.threshold, spec)
    return Encoded(dec.decode_normalized(codes), pre, (codes > 0).sum(0).to(pre.dtype), codes)


def matryoshka_sse(codes: Tensor, W_dec: Tensor, b_dec: Tensor, sae_in: Tensor, prefixes: tuple[int, ...]) -> Tensor:
    """The summed squared errors of the nested prefixes' reconstructions (Matryoshka SAEs,
    Bussmann et al. 2025): prefix w decodes latents [0, w) alone, so the first latents must
    reconstruct on their own. Each prefix adds its group to the last one's reconstruction.

    codes: [b, n] dense; W_dec: [n, d]; b_dec, sae_in: [b, d]; prefixes: increasing widths < n -> scalar.
    """
    total, decoded, start = sae_in.new_zeros(()), b_dec, 0
    for width in prefixes:
        decoded = decoded + codes[:, start:width] @ W_dec[start:width]
        total = total + (decoded - sae_in).pow(2).sum()
        start = width
    return total


def auxk_loss(pre_acts: Tensor, dead: Tensor, residual: Tensor, W_dec: Tensor, k_aux: int) -> Tensor:
    """OpenAI's AuxK: the k_aux largest dead latents of each token reconstruct the main residual.

    pre_acts: [b, n]; dead: [n] bool; residual: [b, d] (detached); W_dec: [n, d] -> scalar:
    squared error over the residual's variance, scaled by min(n_dead / k_aux, 1).
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre_acts.new_zeros(())
    values, indices = pre_acts.masked_fill(~dead, -math.inf).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    e_hat = decode_sparse(indices, values.relu(), W_dec)
    variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
    return min(n_dead / k_aux, 1.0) * (e_hat - residual).pow(2).sum() / variance


def firing_counts(indices: Tensor, values: Tensor, n_features: int, dtype: torch.dtype) -> Tensor:
    """indices, values: [b, k] codes -> [n_features] tokens on which each latent is nonzero."""
    used = (values > 0).flatten().to(dtype)
    return torch.zeros(n_features, dtype=dtype, device=values.device).index_add_(0, indices.flatten(), used)


def distill_loss(pre_acts: Tensor, target: Tensor, k: int, variance: float) -> Tensor:
    """How far the encoder is from the pursuit codes of the same rows: ||(ReLU(pre) - z_gp) * m||^2
    over batch * variance (an FVU-like scale: with unit-norm atoms ||z||^2 is about ||z D||^2),
    where the mask m keeps the latents that either picks: the encoder's k largest pre-activations
    and pursuit's support.

    pre_acts: [b, n] the encoder's last pre-activations; target: [b, n] dense pursuit codes.
    On the pre-activations, not the TopK codes: TopK codes have zero gradient off their support,
    so a term on them could only re-weight the latents the encoder already picks. Here a latent
    that pursuit uses and the encoder misses is pulled up to pursuit's value, one that the encoder
    picks and pursuit does not is pushed down to 0: the support moves. The other latents are left
    out: pulling all n of them to 0 spends the encoder on latents no TopK would pick (measured on
    the embedded cache, the unmasked term did not raise the support overlap with pursuit; this
    one does).
    """
    target = target.to(pre_acts.dtype)
    chosen = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, pre_acts.detach().topk(k, dim=-1).indices, True)
    mask = (chosen | (target > 0)).to(pre_acts.dtype)
    return ((pre_acts.relu() - target) * mask).pow(2).sum() / (pre_acts.shape[0] * variance)


class PursuitDecoded(NamedTuple):
    """Gradient-pursuit codes for a batch and their reconstruction."""

    codes: SparseCodes  # indices/values [b, k], found without grad
    sae_out: Tensor  # [b, d] reconstruction in the normalized space, with grad to the dictionary


def pursuit_decode(sae: SparseAutoencoder, sae_in: Tensor, k: int) -> PursuitDecoded:
    """Gradient-pursuit codes against the current dictionary (no grad), decoded with grad.

    sae_in: [b, d] normalized inputs.
    """
    dec = sae.decoder
    codes = pursuit_codes(sae, sae_in, k)
    return PursuitDecoded(codes, decode_sparse(codes.indices, codes.values, dec.W_dec, dec.b_dec))


def pursuit_codes(sae: SparseAutoencoder, sae_in: Tensor, k: int) -> SparseCodes:
    """Gradient pursuit's codes of normalized inputs sae_in [b, d] against the current dictionary, no grad."""
    dec = sae.decoder
    return gradient_pursuit(sae_in.detach(), dec.W_dec, k, b_dec=dec.b_dec, dense=False)


class Losses(NamedTuple):
    """One batch's losses (scalars) and firing counts."""

    loss: Tensor  # fvu + matryoshka + sparsity + auxk_coef * auxk + pursuit_fvu + distill_coef * distill
    fvu: Tensor  # encoder codes: squared error / total variance (0 with codes='pursuit')
    auxk: Tensor
    pursuit_fvu: Tensor  # pursuit codes' fvu (0 with codes='encoder')
    distill: Tensor  # `distill_loss` (0 without distillation)
    matryoshka: Tensor  # the inner prefixes' summed FVUs (0 without --matryoshka); the outer one is fvu
    sparsity: Tensor  # JumpReLU: the weighted sparsity and pre-activation losses over the variance (else 0)
    counts: Tensor  # [n] tokens on which each latent fired (encoder codes, else pursuit codes)


class Objective(nn.Module):
    """The loss of one batch. DDP wraps this module, so all trained parameters are used in forward.

    variance: E||x_n - mean||^2 over the store, in the dictionary's normalized space; dividing
    the summed squared error by batch * variance makes the loss an FVU. distill_coef > 0 adds
    `distill_loss` toward gradient pursuit's codes at k: the batch's `target` codes when given
    (read from a `saekit pursue` store), else computed here against the current dictionary.
    `prefixes` (Matryoshka) adds each inner prefix's FVU (`matryoshka_sse`). `jumprelu` trains a
    JumpReLU SAE's thresholds and adds its sparsity loss (weighted by forward's `l0_coef`, which
    the loop warms up) instead of AuxK.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        codes: str,
        k: int,
        k_aux: int,
        auxk_coef: float,
        variance: float,
        distill_coef: float = 0.0,
        prefixes: tuple[int, ...] = (),
        jumprelu: JumpReLUTraining | None = None,
    ):
        super().__init__()
        self.prefixes, self.jumprelu = prefixes, jumprelu
        self.sae = sae
        self.codes, self.k, self.k_aux, self.auxk_coef, self.variance = codes, k, k_aux, auxk_coef, variance
        self.distill_coef = distill_coef

    def _fvu(self, sae_out: Tensor, sae_in: Tensor) -> Tensor:
        return (sae_out - sae_in).pow(2).sum() / (sae_in.shape[0] * self.variance)

    def forward(
        self, x: Tensor, dead: Tensor, target: SparseCodes | None = None, l0_coef: float | None = None
    ) -> Losses:
        """x: [b, d] raw activations; dead: [n] bool latents for AuxK; target: indices/values
        [b, k'] pursuit codes of x's rows for distillation (None: computed when distilling);
        l0_coef: JumpReLU's sparsity weight at this step (None: its full value)."""
        sae_in = self.sae.decoder.normalize(x)
        zero = sae_in.new_zeros(())
        loss, fvu, aux, pfvu, dist, mat, spars, counts, pc, enc = (zero,) * 7 + (None, None, None)
        if self.jumprelu is not None or self.codes != "pursuit":
            enc, fvu, aux, mat, spars = self._encoder_terms(sae_in, dead, l0_coef)
            loss, counts = fvu + mat + spars + self.auxk_coef * aux, enc.counts
        if self.codes != "encoder":
            pc = pursuit_decode(self.sae, sae_in, self.k)
            pfvu = self._fvu(pc.sae_out, sae_in)
            loss = loss + pfvu
            if counts is None:
                counts = firing_counts(pc.codes.indices, pc.codes.values, self.sae.n_features, sae_in.dtype)
        if self.distill_coef > 0:
            if target is None:
                target = pc.codes if pc is not None else pursuit_codes(self.sae, sae_in, self.k)
            # Densified on the device: a stored target arrives as [b, k] on the CPU, and a dense
            # [b, n] copy per step would cost far more than the sparse one.
            target = SparseCodes(target.indices.to(sae_in.device), target.values.to(sae_in.device))
            dense = to_dense(target, self.sae.n_features)
            assert enc is not None  # TrainConfig refuses --distill with --codes pursuit
            dist = distill_loss(enc.pre_acts, dense, self.k, self.variance)
            loss = loss + self.distill_coef * dist
        if counts is None:  # TrainConfig admits only encoder, pursuit and both
            raise SaekitError(f"internal: --codes {self.codes!r} computes no codes; report this")
        return Losses(loss, fvu, aux, pfvu, dist, mat, spars, counts)

    def _encoder_terms(
        self, sae_in: Tensor, dead: Tensor, l0_coef: float | None
    ) -> tuple[Encoded, Tensor, Tensor, Tensor, Tensor]:
        """The encoder's codes of normalized inputs and their terms: (encoded, fvu, auxk,
        matryoshka, sparsity); a term the SAE does not have is 0."""
        zero = sae_in.new_zeros(())
        dec = self.sae.decoder
        if self.jumprelu is not None:  # its sparsity loss, not AuxK, keeps latents alive
            enc = jumprelu_encode_decode(self.sae, sae_in, self.jumprelu)
            spars = self._sparsity(enc, dead, self.jumprelu.l0_coef if l0_coef is None else l0_coef)
            return enc, self._fvu(enc.sae_out, sae_in), zero, zero, spars
        enc = encode_decode(self.sae, sae_in)
        mat = aux = zero
        if self.prefixes:
            if enc.codes is None:  # TrainConfig admits --matryoshka only with batchtopk
                raise SaekitError("internal: Matryoshka needs dense codes; report this")
            mat = matryoshka_sse(enc.codes, dec.W_dec, dec.b_dec, sae_in, self.prefixes) / (
                sae_in.shape[0] * self.variance
            )
        if self.auxk_coef > 0:
            residual = (sae_in - enc.sae_out).detach()
            aux = auxk_loss(enc.pre_acts, dead, residual, dec.W_dec, self.k_aux)
        return enc, self._fvu(enc.sae_out, sae_in), aux, mat, zero

    def _sparsity(self, enc: Encoded, dead: Tensor, l0_coef: float) -> Tensor:
        """JumpReLU's sparsity and pre-activation losses, in sae-lens's units over the variance."""
        assert self.jumprelu is not None and enc.codes is not None
        spec, threshold, W_dec = self.jumprelu, self.sae.encoder.threshold, self.sae.decoder.W_dec
        term = l0_coef * sparsity_loss(enc.pre_acts, enc.codes, threshold, W_dec, spec)
        if spec.pre_act_coef > 0:
            term = term + spec.pre_act_coef * pre_act_loss(enc.pre_acts, threshold, dead, W_dec)
        return term / self.variance


def normalized_variance(sae: SparseAutoencoder, mean: Tensor, mean_sq_norm: float) -> float:
    """Total variance of the store's activations in the SAE's normalized space (x - m) * s."""
    variance = float(mean_sq_norm) - float(mean.double().pow(2).sum())
    return max(variance, 1e-12) * float(sae.decoder.input_scale) ** 2

"""The one home of encodings: `encode(x, method, k, sae)` computes any of them for given rows, as
SparseCodes over the SAE's raw-space dictionary:

    "encoder", k=None   the encoder's own output (any trained encoder: an SAE's, an MLP encoder's)
    "encoder", k        its codes at k (`encoder@k`; at its own k, its codes)
    gp, cgp, mp, omp    a pursuit against the dictionary (`saekit.pursuit.METHODS`)
    refit, encoder+gp   from the encoder's codes at k (`saekit.pursuit.ENCODER_METHODS`)

pursue, eval (and pursue --downstream), the dashboard and exports call `encode`; `reconstruct`
turns codes back into activations. Below it: what the encoder outputs (`encoder_output`), its codes
at any k (`encoder_codes`, also the start of refit and encoder+gp and of training's
distillation), and the k a report shows for it. The pursuits themselves live in `saekit.pursuit`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import torch

from saekit.errors import SaekitError
from saekit.pursuit import ENCODER_METHODS, METHODS, MIN_CHUNK_ROWS, SparseCodes, encode_from, pursuit
from saekit.pursuit import reconstruct as reconstruct
from saekit.sae.parts import check_last_dim

if TYPE_CHECKING:  # annotations only
    from saekit.sae import SparseAutoencoder


Encoding = Literal["encoder", "gp", "cgp", "mp", "omp", "refit", "encoder+gp"]
"""What `encode(method=...)` takes: the encoder, a pursuit (`Method`), or one that starts from the encoder (`EncoderMethod`)."""
ENCODER: Encoding = "encoder"
ENCODINGS: tuple[Encoding, ...] = (ENCODER, *METHODS, *ENCODER_METHODS)


def raw_dictionary(
    sae: SparseAutoencoder, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [n, d], b [d]) the SAE's dictionary in raw activation space, float32, detached: what
    every encoding's codes decode against (`reconstruct(codes, W, b)`)."""
    W, b = sae.decoder.raw_dictionary()
    return W.detach().float().to(device), b.detach().float().to(device)


@torch.no_grad()
def encode(
    x: torch.Tensor,
    method: Encoding,
    k: int | None,
    sae: SparseAutoencoder,
    dictionary: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    refine: int = 0,
    start: SparseCodes | None = None,
) -> SparseCodes:
    """The one way to compute an encoding of rows x [b, d_in] (raw activations) at k.

    method: "encoder" (k=None: everything the encoder outputs, `encoder_output`; else its codes
    at k, `encoder_codes`), a pursuit method (gp, cgp, mp, omp) against the SAE's dictionary, or
    refit / encoder+gp (`refine` gp steps), which start from the encoder's codes at k.
    dictionary: (W, b) from `raw_dictionary(sae)`, when the caller already holds it (pass it
    batch after batch: it is not recomputed). start: the encoder's codes of x at k, when the
    caller already has them (pursue times them once for several encodings).
    Returns SparseCodes [b, k] (the encoder's own output: [b, most nonzeros of any row]) over the
    raw dictionary: `reconstruct(codes, W, b)` is the reconstruction.
    """
    if method == ENCODER:
        if start is not None:
            return start
        return encoder_output(sae, x) if k is None else encoder_codes(sae, x, k)
    if k is not None and method in METHODS:
        W, b = dictionary if dictionary is not None else raw_dictionary(sae, x.device)
        return pursuit(x, W, k, method=method, b_dec=b, dense=False)
    if k is not None and method in ENCODER_METHODS:
        W, b = dictionary if dictionary is not None else raw_dictionary(sae, x.device)
        start = start if start is not None else encoder_codes(sae, x, k)
        return encode_from(x, W, method, start, steps=refine, b_dec=b)
    raise SaekitError(f"unknown encoding {method!r} at k={k}: use one of {', '.join(ENCODINGS)}, each with a k")


def as_encoding(name: str) -> Encoding:
    """`name` (a --method, a codes store's method) as an `Encoding`, or one line naming the choices."""
    for e in ENCODINGS:
        if name == e:
            return e
    raise SaekitError(f"unknown encoding {name!r}: use one of {', '.join(ENCODINGS)}")


def encoder_k(sae: SparseAutoencoder) -> float | None:
    """The k a report shows for an SAE's encoder: TopK's k, Batch-TopK's average; None for ReLU and JumpReLU."""
    return sae.k if sae.arch.has_k else None


@torch.no_grad()
def encoder_codes(sae: SparseAutoencoder, x: torch.Tensor, k: int) -> SparseCodes:
    """The SAE encoder's codes of x at k, as SparseCodes over `sae.decoder.raw_dictionary()`.

    x: [..., d_in] raw activations -> indices/values [..., k] (values float32, >= 0): the k
    largest of the encoder's activated pre-activations, where a TopK encoder is taken at k (its
    ReLU'd pre-activations), so at its own k these are exactly its codes; other encoders (ReLU,
    JumpReLU, Batch-TopK's threshold) keep their own activation, capped at k nonzeros; an unrolled
    encoder (`n_unroll` > 0) is taken at its last refinement step's pre-activations. Codes in
    the normalized space and in raw units are the same numbers (`raw_dictionary` folds the
    normalization into the atoms), so `sae.decode(to_dense(codes, n))` equals
    `reconstruct(codes, *sae.decoder.raw_dictionary())`. Slots beyond the encoder's nonzeros hold 0.
    """
    check_last_dim(x, sae.d_in, "inputs", "d_in")
    rows = x.reshape(-1, sae.d_in)
    n = rows.shape[0]
    # Short batches are padded with zero rows, as the pursuits pad short chunks: MKL rounds matmuls
    # of a few rows differently, and encoder+gp's stored codes must not depend on the batching.
    if n < MIN_CHUNK_ROWS:
        rows = torch.cat([rows, rows.new_zeros(MIN_CHUNK_ROWS - n, sae.d_in)])
    xn = sae.decoder.normalize(rows)
    if sae.encoder.n_unroll:  # an unrolled encoder: the pre-activations its last refinement step chose from
        pre = sae.encoder.topk_codes(xn, sae.decoder.b_dec, sae.decoder.W_dec).pre_acts
    else:
        pre = sae.encoder.pre_activations(xn, sae.decoder.b_dec)
    pre = pre[:n]
    acts = (pre.relu() if sae.arch.fixed_k else sae.encoder.activate(pre)).float()
    if sae.encoder.rank_scale is None:
        values, indices = acts.topk(k, dim=-1)
    else:  # a sae-lens TopK SAE's own ranking (`Encoder.set_rank_scale_`)
        indices = sae.encoder.rank_key(acts).topk(k, dim=-1).indices
        values = acts.gather(-1, indices)
    return SparseCodes(indices.reshape(*x.shape[:-1], k), values.reshape(*x.shape[:-1], k))


@torch.no_grad()
def encoder_output(sae: SparseAutoencoder, x: torch.Tensor) -> SparseCodes:
    """Everything the SAE's encoder outputs for x (`sae.encode`), as SparseCodes over
    `sae.decoder.raw_dictionary()`: nothing cut to a k.

    x: [..., d_in] raw activations -> indices/values [..., m] (values float32), m the most
    nonzeros any row of x has (at least 1), so a Batch-TopK encoder at its threshold, a ReLU or a
    JumpReLU encoder keeps every nonzero of every row; slots past a row's nonzeros hold 0. Short
    batches are padded as in `encoder_codes`, so the codes do not depend on the batching.
    """
    if sae.arch.fixed_k:  # exactly k per row: its codes at its own k, without a dense detour
        return encoder_codes(sae, x, sae.encoder.k_per_row)
    check_last_dim(x, sae.d_in, "inputs", "d_in")
    rows = x.reshape(-1, sae.d_in)
    n = rows.shape[0]
    if n < MIN_CHUNK_ROWS:
        rows = torch.cat([rows, rows.new_zeros(MIN_CHUNK_ROWS - n, sae.d_in)])
    dense = sae.encode(rows)[:n].float()
    m = max(1, int((dense != 0).sum(-1).max())) if n else 1
    values, indices = dense.topk(m, dim=-1)
    return SparseCodes(indices.reshape(*x.shape[:-1], m), values.reshape(*x.shape[:-1], m))


def check_encoder_usable(sae: SparseAutoencoder, spec: str | os.PathLike, why: str) -> None:
    """One line when `sae` (given as `spec`) has no encoder to start from: `why` needs one."""
    enc = getattr(sae, "encoder", None)
    if enc is None or (enc.mlp is None and not bool(enc.W_enc.any()) and not bool(enc.b_enc.any())):
        raise SaekitError(
            f"{why} needs an SAE encoder, but {spec} has only a dictionary (its encoder's weights are all zero): "
            "pass an SAE with a trained encoder, or drop those methods"
        )

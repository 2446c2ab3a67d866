"""Sparse codes for any dictionary: gradient, conjugate-gradient, matching and orthogonal pursuit.

Every function finds, for each row of x, at most k nonnegative coefficients over the atoms
(rows) of a dictionary `W_dec: [n_features, d]` so that `codes @ W_dec + b_dec` reconstructs x.
All four share one greedy loop; they differ only in how they update the coefficients:

- `gradient_pursuit` ("gp", Blumensath & Davies 2008, as the original sae-kit does it): select
  the atom with the largest correlation to the residual over ALL atoms (when it is already
  selected, the iteration adds nothing and is one more step), then take one exact line-search
  step along the projected gradient of the selected coefficients, clamped at 0.
  `original_gradient_pursuit` is the published dense formulation, kept as a reference.
- `conjugate_gradient_pursuit` ("cgp"): the same, along a direction made conjugate to the
  previous one (approximate conjugate gradient pursuit, same paper); a lower FVU for the same
  cost, usually at a somewhat larger L0.
- `matching_pursuit` ("mp"): add the best atom's correlation to its coefficient (an atom may be
  picked again; it keeps its slot).
- `orthogonal_pursuit` ("omp"): add the best unselected atom and refit all selected
  coefficients by nonnegative least squares (Lawson-Hanson, float64). Slowest, most accurate.

Cost per iteration is one `[b, d] x [d, n]` correlation matmul; everything else touches only the
<= k selected atoms (`decode_sparse`, an `embedding_bag` over their rows), never a dense
`[b, n] x [n, d]` product. `decode_sparse` is saekit's one decode from indices: training's TopK
path, AuxK, evaluation and `saekit pursue` use it too.
Coefficient math is float32 (float64 in the NNLS refit) whatever the input dtype; rows are
processed in chunks to bound memory; results are deterministic on the CPU and do not depend on
the chunk size.

Guarantees (each is a test): at most k nonzeros per row, all >= 0, no duplicate indices, the
residual norm never increases (up to float32 rounding), zero rows give zero codes and no NaN.

A row stops early (its later slots get value 0) once no atom's projected gradient (its
correlation with the residual; for a coefficient at 0 only a positive one counts) exceeds
`STOP_TOLERANCE * ||x - b_dec||`; this is what makes `x = c * D_j` give exactly one code and
keeps the result scale-equivariant.
"""

from collections.abc import Callable
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.errors import SaekitError
from saekit.pursuit_loop import (
    BACKTRACK_STEPS,
    CHUNK_BYTES,
    METHODS,
    MIN_CHUNK_ROWS,
    STOP_TOLERANCE,
    Method,
    PursuitTrace,
    SparseCodes,
    _default_chunk_rows,
    _dictionary,
    _nnls,
    _prepare,
    _pursue_chunk,
    _rescale,
    _row_max,
    _run,
    _safe_div,
    _State,
    _unit_rows,
    decode_sparse,
    to_dense,
)

__all__ = [  # the one place to import pursuit from (the loop itself is in saekit.pursuit_loop)
    "ALL_METHODS",
    "BACKTRACK_STEPS",
    "CHUNK_BYTES",
    "DEFAULT_REFINE",
    "ENCODER_METHODS",
    "METHODS",
    "EncoderMethod",
    "Method",
    "MIN_CHUNK_ROWS",
    "STOP_TOLERANCE",
    "PursuitTrace",
    "SparseCodes",
    "conjugate_gradient_pursuit",
    "decode_sparse",
    "encode_from",
    "gradient_pursuit",
    "matching_pursuit",
    "original_gradient_pursuit",
    "orthogonal_pursuit",
    "pursuit",
    "pursuit_trace",
    "reconstruct",
    "refine",
    "refit",
    "to_dense",
]

# --- public API -----------------------------------------------------------------------------


def reconstruct(codes: SparseCodes, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """codes @ W_dec + b_dec in float32 on W_dec's device, without grad (`decode_sparse`).

    codes: indices/values [..., k]; W_dec: [n_features, d]; b_dec: [d] or None -> [..., d]
    """
    W = W_dec.detach().float()
    bias = None if b_dec is None else b_dec.detach().float().to(W.device)
    return decode_sparse(codes.indices.to(W.device), codes.values.to(W), W, bias)


@overload
def gradient_pursuit(
    x: Tensor, decoder: Any, k: int, *, b_dec: Tensor | None = ..., chunk_size: int | None = ..., dense: Literal[False]
) -> SparseCodes: ...
@overload
def gradient_pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    b_dec: Tensor | None = ...,
    chunk_size: int | None = ...,
    dense: bool | None = ...,
) -> SparseCodes | Tensor: ...
def gradient_pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Nonnegative gradient pursuit: k greedy selections, each followed by one projected
    exact-line-search gradient step on the selected coefficients.

    x: [..., d] activations, any float dtype. decoder: W_dec [n_features, d] (any row norms), or
    a decoder object: a saekit `Decoder` (pursued against its `raw_dictionary()`, the raw-space
    atoms, so codes are what its `decode` expects even with input normalization) or any object
    with `.W_dec` [n_features, d] and `.b_dec` [d] such as a sae-lens SAE. b_dec: subtracted
    from x first (default: the object's b_dec, none for a tensor). chunk_size: rows per chunk
    (None: bounded by CHUNK_BYTES).
    dense: return dense [..., n_features] codes (in W_dec's dtype) instead of SparseCodes;
    None means "dense iff decoder is an object", so the original sae-kit call
    `sae.decode(gradient_pursuit(acts, sae.decoder, k=67))` works unchanged.
    Computes on W_dec's device.
    """
    return _run(x, decoder, k, "gp", b_dec=b_dec, chunk_size=chunk_size, dense=dense)


def conjugate_gradient_pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Approximate conjugate gradient pursuit (nonnegative); arguments as `gradient_pursuit`."""
    return _run(x, decoder, k, "cgp", b_dec=b_dec, chunk_size=chunk_size, dense=dense)


def matching_pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Nonnegative matching pursuit, k iterations; arguments as `gradient_pursuit`."""
    return _run(x, decoder, k, "mp", b_dec=b_dec, chunk_size=chunk_size, dense=dense)


def orthogonal_pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Nonnegative orthogonal matching pursuit: an exact NNLS refit of the selected
    coefficients after each selection (slow, most accurate); arguments as `gradient_pursuit`."""
    return _run(x, decoder, k, "omp", b_dec=b_dec, chunk_size=chunk_size, dense=dense)


@overload
def pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    method: Method = ...,
    b_dec: Tensor | None = ...,
    chunk_size: int | None = ...,
    dense: Literal[False],
) -> SparseCodes: ...
@overload
def pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    method: Method = ...,
    b_dec: Tensor | None = ...,
    chunk_size: int | None = ...,
    dense: bool | None = ...,
) -> SparseCodes | Tensor: ...
def pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    method: Method = "gp",
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Run the pursuit named by `method` (one of METHODS); arguments as `gradient_pursuit`."""
    return _run(x, decoder, k, method, b_dec=b_dec, chunk_size=chunk_size, dense=dense)


@torch.no_grad()
def pursuit_trace(
    x: Tensor, decoder: Any, k: int, *, method: Method = "gp", b_dec: Tensor | None = None
) -> PursuitTrace:
    """Run a pursuit on x: [b, d] in one chunk and record the residual norm after every
    iteration (for tests and diagnostics; costs one extra gather per iteration)."""
    W, bias = _dictionary(decoder, b_dec)
    xc, _ = _prepare(x, W, bias, k, method)
    W_unit, norms = _unit_rows(W)
    norms_out: list[Tensor] = [xc.norm(dim=1)]

    def record(state: "_State", t: int) -> None:
        r = state.x - decode_sparse(state.indices[:, : t + 1], state.values[:, : t + 1], W_unit)
        norms_out.append(r.norm(dim=1)[: xc.shape[0]])

    codes = _pursue_chunk(xc, W_unit, k, method, on_step=record)
    return PursuitTrace(_rescale(codes, norms), torch.stack(norms_out))


@torch.no_grad()
def original_gradient_pursuit(x: Tensor, W_dec: Tensor, k: int, b_dec: Tensor | None = None) -> Tensor:
    """The original sae-kit's gradient pursuit, as published (Blumensath & Davies 2008 in the
    batched form of dictionary_learning's grad_pursuit.py): a reference for tests and the
    benchmark's baseline, not for use. Dense: three [b, n]-by-[n, d]-sized matmuls per iteration.

    Each iteration: residual = x - w @ D; add argmax over ALL atoms of residual @ D.T to the
    selected mask (it may already be there: then the iteration is one more gradient step);
    grad = mask * (residual @ D.T); c = grad @ D; step = <c, r> / <c, c>; w = max(w + step *
    grad, 0). No stopping rule and no backtracking; the one addition is that a zero residual
    gives step 0 instead of 0/0 = NaN.

    x: [b, d]; W_dec: [n, d] (rows used as given); b_dec: [d] subtracted from x first
    -> weights [b, n] float32 (at most k nonzeros per row)
    """
    D = W_dec.detach().float()
    target = x.detach().float().to(D.device)
    if b_dec is not None:
        target = target - b_dec.detach().float().to(D.device)
    rows = torch.arange(target.shape[0], device=D.device)
    weights = target.new_zeros(target.shape[0], D.shape[0])
    selected = torch.zeros_like(weights, dtype=torch.bool)
    for _ in range(k):
        residual = target - weights @ D
        inner = residual @ D.T
        selected[rows, inner.argmax(dim=1)] = True
        grad = inner * selected
        c = grad @ D
        step = _safe_div(torch.linalg.vecdot(c, residual), torch.linalg.vecdot(c, c))
        weights = (weights + step[:, None] * grad).clamp_min_(0)
    return weights


# --- starting from an encoder's codes -------------------------------------------------------

EncoderMethod = Literal["refit", "encoder+gp"]
"""An encoding that starts from an encoder's codes: what `encode_from(method=...)` takes."""
ENCODER_METHODS: tuple[EncoderMethod, ...] = ("refit", "encoder+gp")
ALL_METHODS = METHODS + ENCODER_METHODS
"""Encodings that start from an SAE encoder's codes (`encode_from`): `refit` keeps the encoder's
support and refits its coefficients, `encoder+gp` runs gradient pursuit from the encoder's codes."""
DEFAULT_REFINE = 3
"""`refine`'s default number of steps (`--refine`): see `saekit.pursue.PursueConfig.refine`."""


@torch.no_grad()
def refit(
    x: Tensor, decoder: Any, codes: SparseCodes, *, b_dec: Tensor | None = None, chunk_size: int | None = None
) -> SparseCodes:
    """The best coefficients on the support of `codes`: nonnegative least squares over its atoms.

    x: [..., d]; codes: indices/values [..., k] over the dictionary (an encoder's, e.g.
    `saekit.encodings.encoder_codes`); decoder and b_dec as in `gradient_pursuit`. Returns the same
    indices with values = argmin_{v >= 0} ||x - b_dec - v @ W_dec[indices]||, where only slots
    with a value > 0 may be nonzero (the support; an unused slot stays 0). Never a larger residual
    than `codes` (a row the refit would not improve keeps its values, so rounding cannot make it
    worse). Cost: no [b, n]-sized work at all; per row a [k, k] float64 Gram matrix and a few
    batched Lawson-Hanson solves, started from `codes` (O(b k^2 d + b k^3)).
    """
    return _from_codes(x, decoder, codes, _refit_chunk, b_dec=b_dec, chunk_size=chunk_size)


@torch.no_grad()
def refine(
    x: Tensor,
    decoder: Any,
    codes: SparseCodes,
    steps: int,
    *,
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
) -> SparseCodes:
    """ "encoder+gp": `steps` iterations of gradient pursuit started from `codes`, at their width k.

    x: [..., d]; codes: indices/values [..., k] (an encoder's, e.g. `saekit.encodings.encoder_codes`);
    decoder and b_dec as in `gradient_pursuit`. Each iteration, per row: the correlation of the
    residual with every atom (the one [b, d] x [d, n] matmul); the best atom outside the row's k
    slots becomes a (k+1)-th candidate; one exact line-search step along the projected gradient
    of the k+1 coefficients, clamped at 0 (halved up to BACKTRACK_STEPS times while it would not
    lower the residual); then the k largest are kept, so an atom can swap in for a weaker one.
    A row keeps its previous codes whenever no step lowers its residual: the residual never
    increases with `steps`, row by row. steps=0 returns `codes` itself.
    Cost: T = steps correlation matmuls, the size of a linear encoder's: with the encoder's own
    matmul, 1 + T, against gradient pursuit's k.
    """
    if steps < 0:
        raise SaekitError(f"refine steps {steps} must be >= 0 (0: the codes as given)")
    if steps == 0:
        return codes
    step_fn = lambda xc, W, idx, val: _refine_chunk(xc, W, idx, val, steps)  # noqa: E731
    return _from_codes(x, decoder, codes, step_fn, b_dec=b_dec, chunk_size=chunk_size, matmul=True)


def encode_from(
    x: Tensor,
    decoder: Any,
    method: EncoderMethod,
    start: SparseCodes,
    *,
    steps: int = DEFAULT_REFINE,
    b_dec: Tensor | None = None,
) -> SparseCodes:
    """An ENCODER_METHODS encoding of x from the encoder's codes `start`: `refit`, or `refine`
    for `steps` ("encoder+gp")."""
    if method == "refit":
        return refit(x, decoder, start, b_dec=b_dec)
    if method == "encoder+gp":
        return refine(x, decoder, start, steps, b_dec=b_dec)
    raise SaekitError(f"unknown encoder-based method {method!r}; use one of {', '.join(ENCODER_METHODS)}")


def _from_codes(
    x: Tensor,
    decoder: Any,
    codes: SparseCodes,
    chunk_fn: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    *,
    b_dec: Tensor | None,
    chunk_size: int | None,
    matmul: bool = False,
) -> SparseCodes:
    """Run chunk_fn(x [r, d] centred, unit atoms [n, d], indices [r, k], unit-scale values [r, k])
    -> (indices, values) over row chunks; rows it leaves unchanged keep their exact input values."""
    W, bias = _dictionary(decoder, b_dec)
    k = codes.indices.shape[-1]
    if k == 0:
        return codes
    xc, lead = _prepare(x, W, bias, max(k, 1), "gp")
    n, d = W.shape
    if tuple(codes.indices.shape) != (*lead, k) or codes.values.shape != codes.indices.shape:
        raise SaekitError(
            f"codes of shape {tuple(codes.indices.shape)} do not match activations of shape {tuple(x.shape)}: "
            "pass one [..., k] row of codes per row of x"
        )
    idx = codes.indices.reshape(-1, k).to(W.device, torch.long)
    val = codes.values.reshape(-1, k).to(W.device, torch.float32)
    if idx.numel() and bool(((idx < 0) | (idx >= n)).any()):
        raise SaekitError(f"codes hold atom indices outside 0..{n - 1}: they are not codes over this dictionary")
    W_unit, norms = _unit_rows(W)
    rows = chunk_size or (_default_chunk_rows(n, d, k, "gp") if matmul else _default_chunk_rows(0, d, k, "omp"))
    parts = [
        chunk_fn(xs, W_unit, i, v * norms[i]) for xs, i, v in zip(xc.split(rows), idx.split(rows), val.split(rows))
    ]
    new_idx = torch.cat([p[0] for p in parts]) if parts else idx
    new_val = torch.cat([p[1] for p in parts]) if parts else val
    changed = ((new_idx != idx) | (new_val != val * norms[idx])).any(dim=1, keepdim=True)
    out = _rescale(SparseCodes(new_idx, new_val), norms)
    values = torch.where(changed, out.values, val)
    return SparseCodes(new_idx.reshape(*lead, k), values.reshape(*lead, k))


def _residual_sq(x: Tensor, W: Tensor, idx: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """(residual [b, d], its squared norm [b]) of codes (idx, val) over W for x."""
    r = x - decode_sparse(idx, val, W)
    return r, (r * r).sum(1)


def _refit_chunk(x: Tensor, W: Tensor, idx: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """x: [b, d]; W: [n, d] unit rows; idx, val: [b, k] -> (idx, NNLS values on val > 0)."""
    active = val > 0
    atoms = W[idx].double()  # [b, k, d]
    both = active[:, :, None] & active[:, None, :]
    eye = torch.eye(idx.shape[1], dtype=torch.float64, device=x.device)
    # Slots outside the support get an identity row and no target, so they stay at 0.
    G = torch.where(both, torch.bmm(atoms, atoms.transpose(1, 2)), eye)
    h = torch.bmm(atoms, x.double()[:, :, None]).squeeze(-1) * active
    c = _nnls(G, h, val.double() * active, tol=1e-9 * x.double().norm(dim=1), solved=False).float()
    _, before = _residual_sq(x, W, idx, val)
    _, after = _residual_sq(x, W, idx, c)
    return idx, torch.where((after < before)[:, None], c, val)


def _refine_chunk(x: Tensor, W: Tensor, idx: Tensor, val: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """x: [b, d]; W: [n, d] unit rows; idx, val: [b, k] -> `steps` warm-started GP iterations."""
    b = x.shape[0]
    if b < MIN_CHUNK_ROWS:  # the same padding as the pursuits: a row's result never depends on its chunk
        pad = MIN_CHUNK_ROWS - b
        x, idx, val = F.pad(x, (0, 0, 0, pad)), F.pad(idx, (0, 0, 0, pad)), F.pad(val, (0, 0, 0, pad))
    tol = STOP_TOLERANCE * x.norm(dim=1)
    residual, err = _residual_sq(x, W, idx, val)
    corr = x.new_empty(x.shape[0], W.shape[0])
    for _ in range(steps):
        idx, val, residual, err = _refine_step(x, W, idx, val, residual, err, tol, corr)
    return idx[:b], val[:b]


def _refine_step(
    x: Tensor, W: Tensor, idx: Tensor, val: Tensor, residual: Tensor, err: Tensor, tol: Tensor, corr: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One `refine` iteration on all rows; rows whose residual would not shrink keep their codes."""
    k = idx.shape[1]
    torch.mm(residual, W.T, out=corr)  # [b, n]: the one big matmul
    support = corr.gather(1, idx)
    corr.scatter_(1, idx, float("-inf"))
    best, atom = _row_max(corr)
    new = best > tol
    cand_idx = torch.cat([idx, atom[:, None]], dim=1)  # [b, k + 1]
    cand_val = F.pad(val, (0, 1))
    cand_corr = torch.cat([support, (best * new)[:, None]], dim=1)
    # minus the projected gradient: a coefficient at 0 may only grow
    direction = cand_corr * ((cand_val > 0) | (cand_corr > 0))
    image = decode_sparse(cand_idx, direction, W)
    step = _safe_div(torch.linalg.vecdot(direction, cand_corr), torch.linalg.vecdot(image, image))
    pending = step > 0
    for _ in range(BACKTRACK_STEPS + 1):
        moved = (cand_val + step[:, None] * direction).clamp_min_(0)
        moved[:, k].masked_fill_(~new, float("-inf"))  # no new atom worth adding: never kept
        top_val, slot = moved.topk(k, dim=1)  # the k largest coefficients stay
        top_idx = cand_idx.gather(1, slot)
        top_res, top_err = _residual_sq(x, W, top_idx, top_val)
        ok = pending & (top_err < err)
        idx = torch.where(ok[:, None], top_idx, idx)
        val = torch.where(ok[:, None], top_val, val)
        residual = torch.where(ok[:, None], top_res, residual)
        err = torch.where(ok, top_err, err)
        pending &= ~ok
        if not pending.any():
            break
        step = step * 0.5
    return idx, val, residual, err

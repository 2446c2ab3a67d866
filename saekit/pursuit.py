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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.config import check_k
from saekit.errors import SaekitError

# Correlations below sqrt(float32 eps) * ||x|| are residual rounding noise, not signal (the same
# threshold as transformer-lens's gradient pursuit).
STOP_TOLERANCE = math.sqrt(torch.finfo(torch.float32).eps)
# Halvings tried when a projected step would increase the residual (then the step is dropped).
BACKTRACK_STEPS = 20
# Default chunk: as many rows as keep the per-chunk workspace (mostly the [rows, n_features]
# float32 correlation) under 256 MiB.
CHUNK_BYTES = 256 * 2**20
# MKL computes matmuls of fewer than ~16 rows with a kernel that rounds differently; short
# chunks are padded with zero rows so a row's codes never depend on how the batch was split.
MIN_CHUNK_ROWS = 32


class SparseCodes(NamedTuple):
    """k coefficients per row over a dictionary of n_features atoms.

    indices: [..., k] int64, unique within a row
    values:  [..., k] float32, all >= 0; a slot may hold 0: an atom clamped to 0, or an unused
        slot (the row stopped early, or an iteration re-selected an atom it already had).
        Unused slots hold, in order, the smallest atoms of 0..k-1 that the row does not use.
    """

    indices: Tensor
    values: Tensor


class PursuitTrace(NamedTuple):
    """A pursuit's codes and how its residual shrank.

    codes: SparseCodes with indices/values [b, k]
    residual_norms: [k + 1, b] float32, ||x - b_dec - codes_t @ W_dec|| before the first
        iteration (t = 0) and after each of the k iterations, recomputed from the codes
    """

    codes: SparseCodes
    residual_norms: Tensor


# --- public API -----------------------------------------------------------------------------


def to_dense(codes: SparseCodes, n_features: int) -> Tensor:
    """Scatter codes into a dense [..., n_features] float32 tensor (duplicate indices add up)."""
    lead = codes.indices.shape[:-1]
    k = codes.indices.shape[-1]
    idx = codes.indices.reshape(-1, k)
    val = codes.values.reshape(-1, k).float()
    dense = val.new_zeros(idx.shape[0], n_features)
    dense.scatter_add_(1, idx, val)
    return dense.reshape(*lead, n_features)


def decode_sparse(indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """sum_j values[..., j] * W_dec[indices[..., j]] (+ b_dec): the one decode from indices.

    indices: [..., k] int64; values: [..., k]; W_dec: [n_features, d]; b_dec: [d] or None
    -> [..., d] in W_dec's dtype, on W_dec's device (indices and values must be there too).
    Gathers only the k chosen atoms per row (`embedding_bag`), never a dense [.., n] x [n, d]
    product or a [.., k, d] buffer; differentiable in values, W_dec and b_dec. Equals
    `to_dense(SparseCodes(indices, values), n) @ W_dec + b_dec` up to rounding.
    """
    lead, k = indices.shape[:-1], indices.shape[-1]
    if k == 0:
        out = W_dec.new_zeros(lead.numel(), W_dec.shape[1])
    else:
        flat_idx, flat_val = indices.reshape(-1, k), values.reshape(-1, k).to(W_dec.dtype)
        out = F.embedding_bag(flat_idx, W_dec, per_sample_weights=flat_val, mode="sum")
    if b_dec is not None:
        out = out + b_dec
    return out.reshape(*lead, W_dec.shape[1])


def reconstruct(codes: SparseCodes, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """codes @ W_dec + b_dec in float32 on W_dec's device, without grad (`decode_sparse`).

    codes: indices/values [..., k]; W_dec: [n_features, d]; b_dec: [d] or None -> [..., d]
    """
    W = W_dec.detach().float()
    bias = None if b_dec is None else b_dec.detach().float().to(W.device)
    return decode_sparse(codes.indices.to(W.device), codes.values.to(W), W, bias)


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


def pursuit(
    x: Tensor,
    decoder: Any,
    k: int,
    *,
    method: str = "gp",
    b_dec: Tensor | None = None,
    chunk_size: int | None = None,
    dense: bool | None = None,
) -> SparseCodes | Tensor:
    """Run the pursuit named by `method` (one of METHODS); arguments as `gradient_pursuit`."""
    return _run(x, decoder, k, method, b_dec=b_dec, chunk_size=chunk_size, dense=dense)


@torch.no_grad()
def pursuit_trace(x: Tensor, decoder: Any, k: int, *, method: str = "gp", b_dec: Tensor | None = None) -> PursuitTrace:
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

ENCODER_METHODS = ("refit", "encoder+gp")
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
    `saekit.sae.encoder_codes`); decoder and b_dec as in `gradient_pursuit`. Returns the same
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

    x: [..., d]; codes: indices/values [..., k] (an encoder's, e.g. `saekit.sae.encoder_codes`);
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
    method: str,
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


# --- the shared loop ------------------------------------------------------------------------


class _State:
    """Mutable per-chunk state of the greedy loop (rows b, slots k, model width d).

    x: [b, d] centred input; residual: [b, d]; indices/values: [b, k], slot t written by
    iteration t; filled: [b, k] slots holding a selected atom (an iteration that adds no atom
    leaves its slot empty: index 0, value 0, until `_fill_empty_slots_`); done: [b] rows that
    stopped (frozen from then on); tol: [b] stopping threshold; extra: per-method state (CGP
    direction, OMP Gram matrix).
    """

    def __init__(self, x: Tensor, k: int):
        b = x.shape[0]
        self.x = x
        self.residual = x.clone()
        self.indices = torch.zeros(b, k, dtype=torch.long, device=x.device)
        self.values = x.new_zeros(b, k)
        self.filled = torch.zeros(b, k, dtype=torch.bool, device=x.device)
        self.done = torch.zeros(b, dtype=torch.bool, device=x.device)
        self.tol = STOP_TOLERANCE * x.norm(dim=1)
        self.corr: Tensor | None = None  # [b, n] reused: a fresh one each iteration page-faults
        self.extra: dict[str, Tensor] = {}


class _Selection(NamedTuple):
    """What the correlation matmul of iteration t tells the update.

    corr: [b, t+1] correlation of slots 0..t's atoms with the residual (= minus the gradient of
        0.5 * ||residual||^2 w.r.t. their coefficients); 0 for empty slots
    best: [b] largest correlation over the candidates (all atoms, or the unselected ones)
    hit: [b, t+1] the slot that already holds the best atom (a re-selection), if any
    """

    corr: Tensor
    best: Tensor
    hit: Tensor


def _select_(s: _State, W: Tensor, t: int, unselected_only: bool = False) -> _Selection:
    """The iteration's one big matmul; puts the best atom into slot t if it is new and worth it.

    W: [n, d] unit rows. The best atom over ALL atoms is taken, as Blumensath & Davies and the
    original sae-kit do: when it is already selected, slot t stays empty and the iteration is
    one more step on the current support (so indices stay unique, and an atom clamped to 0
    stays selected and may grow again). OMP passes unselected_only (after an exact refit no
    selected atom has a useful correlation).
    """
    if s.corr is None:
        s.corr = s.residual.new_empty(s.residual.shape[0], W.shape[0])
    corr = torch.mm(s.residual, W.T, out=s.corr)  # [b, n]
    chosen, filled = s.indices[:, :t], s.filled[:, :t]
    support_corr = corr.gather(1, chosen) * filled
    if unselected_only:
        corr.scatter_(1, chosen, float("-inf"))
    best, atom = _row_max(corr)
    hit = filled & (chosen == atom[:, None])
    new = ~hit.any(dim=1) & ~s.done & (best > s.tol)
    s.indices[:, t] = atom * new
    s.filled[:, t] = new
    slots_corr = torch.cat([support_corr, (best * new)[:, None]], dim=1)
    return _Selection(slots_corr, best, F.pad(hit, (0, 1)))


def _pursue_chunk(
    x: Tensor,
    W: Tensor,
    k: int,
    method: str,
    on_step: Callable[[_State, int], None] | None = None,
) -> SparseCodes:
    """x: [b, d] float32 centred; W: [n, d] float32 unit rows -> codes over W (unit scale)."""
    b = x.shape[0]
    if b < MIN_CHUNK_ROWS:
        x = F.pad(x, (0, 0, 0, MIN_CHUNK_ROWS - b))  # zero rows stop at once
    s = _State(x, k)
    update_ = _UPDATES[method]
    for t in range(k):
        sel = _select_(s, W, t, unselected_only=method == "omp")
        update_(s, W, t, sel)
        if on_step is not None:
            on_step(s, t)
    _fill_empty_slots_(s)
    return SparseCodes(s.indices[:b], s.values[:b])


def _fill_empty_slots_(s: _State) -> None:
    """Give each empty slot, in order, the next smallest atom of 0..k-1 the row does not use.

    A row uses at most k - (empty slots) atoms, so 0..k-1 always holds enough unused ones.
    """
    b, k = s.indices.shape
    used = torch.where(s.filled, s.indices.clamp_max(k), k)  # atoms >= k go to a spare column
    free = torch.ones(b, k + 1, dtype=torch.bool, device=s.indices.device)
    free.scatter_(1, used, False)
    order = (~free[:, :k]).to(torch.uint8).argsort(dim=1, stable=True)  # unused atoms first
    nth_empty = ((~s.filled).cumsum(dim=1) - 1).clamp_min(0)
    s.indices = torch.where(s.filled, s.indices, order.gather(1, nth_empty))


# --- coefficient updates (one per method) ---------------------------------------------------


def _stop_(s: _State, score: Tensor) -> Tensor:
    """Mark rows whose score (best correlation, or largest projected gradient) is noise as done
    (for good); returns live rows [b]."""
    s.done |= score <= s.tol
    return ~s.done


def _projected_gradient(s: _State, t: int, sel: _Selection) -> Tensor:
    """Minus the gradient over slots 0..t, zero where a coefficient at 0 would have to go
    negative (those neither move nor count as clamped) and on stopped rows -> [b, t+1].

    A row stops when no atom's projected gradient exceeds the tolerance: an unselected atom's
    is at most `best`, a selected one's is its entry here.
    """
    g = sel.corr * ((s.values[:, : t + 1] > 0) | (sel.corr > 0))
    live = _stop_(s, torch.maximum(g.abs().amax(dim=1), sel.best))
    return g * live[:, None]


def _gp_update_(s: _State, W: Tensor, t: int, sel: _Selection) -> None:
    g = _projected_gradient(s, t, sel)
    g_image = decode_sparse(s.indices[:, : t + 1], g, W)  # [b, d] = g @ A
    _projected_step_(s, W, t, sel.corr, g, g_image)


def _cgp_update_(s: _State, W: Tensor, t: int, sel: _Selection) -> None:
    g = _projected_gradient(s, t, sel)
    g_image = decode_sparse(s.indices[:, : t + 1], g, W)
    if t == 0:
        direction, image = g, g_image
    else:
        # beta makes the new direction A-conjugate to the previous one (B&D's approximate CGP).
        prev_dir, prev_image = s.extra["direction"], s.extra["image"]
        beta = -_safe_div(torch.linalg.vecdot(prev_image, g_image), torch.linalg.vecdot(prev_image, prev_image))
        direction = g + beta[:, None] * F.pad(prev_dir, (0, 1))
        image = g_image + beta[:, None] * prev_image
        # A direction that pushes a coefficient already at 0 downward is infeasible from the
        # start: restart such rows from the projected gradient.
        restart = ((direction < 0) & (s.values[:, : t + 1] <= 0)).any(dim=1, keepdim=True)
        direction = torch.where(restart, g, direction)
        image = torch.where(restart, g_image, image)
    clamped = _projected_step_(s, W, t, sel.corr, direction, image)
    # A clamped step left the direction's span; restart from plain gradient next time.
    keep = (~clamped)[:, None]
    s.extra["direction"] = direction * keep
    s.extra["image"] = image * keep


def _mp_update_(s: _State, W: Tensor, t: int, sel: _Selection) -> None:
    # Plain MP adds the best atom's correlation to its coefficient: a re-selected atom's slot,
    # else slot t (where _select_ put a new atom).
    live = _stop_(s, sel.best)
    amount = sel.best * live
    slot = torch.where(sel.hit.any(dim=1), sel.hit.int().argmax(dim=1), t)
    s.values.scatter_add_(1, slot[:, None], amount[:, None])
    atom = W.index_select(0, s.indices.gather(1, slot[:, None]).squeeze(1))
    s.residual.addcmul_(amount[:, None], atom, value=-1)


def _omp_update_(s: _State, W: Tensor, t: int, sel: _Selection) -> None:
    live = _stop_(s, sel.best)
    b, k = s.values.shape
    m = t + 1
    if t == 0:
        s.extra["gram"] = torch.zeros(b, k, k, dtype=torch.float64, device=s.x.device)
        s.extra["h"] = torch.zeros(b, k, dtype=torch.float64, device=s.x.device)
    gram, h = s.extra["gram"], s.extra["h"]
    # Grow the Gram matrix of the selected atoms by one row/column (float64: NNLS is ill-posed
    # enough in float32 to miss the optimum). Live rows have every slot 0..t filled.
    atoms = W[s.indices[:, :m]].double()  # [b, m, d]
    new_row = torch.bmm(atoms, atoms[:, t, :, None]).squeeze(-1)  # [b, m]
    gram[:, t, :m] = new_row
    gram[:, :m, t] = new_row
    h[:, t] = (atoms[:, t] * s.x.double()).sum(1)
    rows = live.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    c = _nnls(
        gram[rows, :m, :m],
        h[rows, :m],
        s.values[rows, :m].double(),
        tol=1e-9 * s.x[rows].double().norm(dim=1),
    )
    s.values[rows, :m] = c.float()
    s.residual[rows] = s.x[rows] - decode_sparse(s.indices[rows, :m], s.values[rows, :m], W)


_UPDATES = {"gp": _gp_update_, "cgp": _cgp_update_, "mp": _mp_update_, "omp": _omp_update_}
METHODS = tuple(_UPDATES)
ALL_METHODS = METHODS + ENCODER_METHODS
"""Every `--method` of `saekit pursue` and `saekit eval`: the pursuits, then those from the encoder."""


def _projected_step_(s: _State, W: Tensor, t: int, corr: Tensor, direction: Tensor, image: Tensor) -> Tensor:
    """Exact line search along `direction` over slots 0..t, then clamp at 0.

    corr: [b, t+1] = A @ residual (A: the atoms of slots 0..t [t+1, d] per row); direction:
    [b, t+1], never negative where a coefficient is 0; image: [b, d] = direction @ A.
    The unclamped step is optimal on the quadratic, so the residual strictly shrinks; when the
    clamp bites (a positive coefficient would go negative), the step is halved until the
    clamped point does not increase the residual (or dropped). Returns clamped: [b] rows
    where the clamp changed the step.
    """
    m = t + 1
    # <image, residual> = <direction, A residual>: no [b, d] pass needed.
    step = _safe_div(torch.linalg.vecdot(direction, corr), torch.linalg.vecdot(image, image))
    moved = s.values[:, :m] + step[:, None] * direction
    clamped = (moved < 0).any(dim=1)
    rows = clamped.nonzero().squeeze(1)
    start = s.values[rows, :m]  # a copy: the rows that may need backtracking
    s.values[:, :m] = moved.clamp_min_(0)
    s.residual.addcmul_(step[:, None], image, value=-1)
    if rows.numel() > 0:
        _backtrack_(s, W, m, rows, start, direction[rows], step[rows])
    return clamped


def _backtrack_(s: _State, W: Tensor, m: int, rows: Tensor, start: Tensor, direction: Tensor, step: Tensor) -> None:
    """Halve `step` on `rows` until the clamped point's residual is no larger than before.

    start, direction: [r, m] coefficients before the step and the step direction; step: [r].
    """
    idx = s.indices[rows, :m]
    x = s.x[rows]
    before = x - decode_sparse(idx, start, W)
    limit = (before * before).sum(1)
    best_values, best_residual = start, before
    pending = torch.ones_like(step, dtype=torch.bool)
    for _ in range(BACKTRACK_STEPS + 1):
        cand = (start + step[:, None] * direction).clamp_min_(0)
        res = x - decode_sparse(idx, cand, W)
        ok = pending & ((res * res).sum(1) <= limit)
        best_values = torch.where(ok[:, None], cand, best_values)
        best_residual = torch.where(ok[:, None], res, best_residual)
        pending &= ~ok
        if not pending.any():
            break
        step = step * 0.5
    s.values[rows, :m] = best_values
    s.residual[rows] = best_residual


def _nnls(G: Tensor, h: Tensor, c: Tensor, tol: Tensor, ridge: float = 1e-10, solved: bool = True) -> Tensor:
    """Batched Lawson-Hanson: argmin_{c >= 0} 0.5 c^T G c - h^T c, warm-started.

    G: [r, m, m] float64 Gram matrix; h: [r, m]; c: [r, m] feasible start (>= 0);
    tol: [r] a dual value above which an atom is worth freeing -> c: [r, m].
    solved: c is already optimal on its positive entries (OMP's previous refit); False (any
    feasible start, e.g. an encoder's codes) solves on them first.
    Every step lowers the objective, so stopping at the iteration cap is still an improvement.
    """
    r, m = h.shape
    eye = torch.eye(m, dtype=G.dtype, device=G.device)
    G = G + ridge * eye  # zero-norm or dependent atoms would make the solves singular
    c = c.clone()
    passive = c > 0
    check = torch.full((r,), solved, dtype=torch.bool, device=G.device)  # c is optimal on its passive set
    converged = torch.zeros_like(check)
    for _ in range(3 * m + 10):
        # KKT check: stop, or free the atom whose dual (minus the gradient) is largest.
        dual = (h - (G @ c[..., None]).squeeze(-1)).masked_fill(passive, float("-inf"))
        best, j = dual.max(dim=1)
        converged |= check & (best <= tol)
        add = check & ~converged
        passive[add, j[add]] = True
        live = (~converged).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        # Unconstrained least squares on each live row's passive set (identity elsewhere).
        P, c_live = passive[live], c[live]
        sol = torch.linalg.solve(torch.where(P[:, :, None] & P[:, None, :], G[live], eye), h[live] * P)
        bad = P & (sol <= 0)
        feasible = ~bad.any(dim=1)
        # Infeasible rows move toward sol until the first coefficient reaches 0, releasing it.
        ratio = torch.where(bad, c_live / (c_live - sol).clamp_min(1e-300), torch.inf)
        alpha, first = ratio.min(dim=1)
        moved = (c_live + alpha.clamp(0, 1)[:, None] * (sol - c_live)).clamp_min(0)
        moved[torch.arange(live.numel(), device=G.device), first] = 0
        c[live] = torch.where(feasible[:, None], sol * P, moved)
        passive[live] = torch.where(feasible[:, None], P, P & (moved > 0))
        check = torch.zeros_like(check)
        check[live] = feasible
    return c * passive


# --- helpers --------------------------------------------------------------------------------


def _row_max(a: Tensor, groups: int = 16) -> tuple[Tensor, Tensor]:
    """a.max(dim=1) for a: [b, n] -> (values [b], indices [b]), in two passes when n allows.

    On the CPU, max-with-index over a long row runs ~4x slower than a plain vectorised max; so
    take the max over `groups` strided slices first ([b, n / groups], vectorised), then the
    index in the winning column. A tie may resolve to another (equally valid) index.
    """
    b, n = a.shape
    if n % groups or n < 4 * groups:
        return a.max(dim=1)
    view = a.view(b, groups, n // groups)
    best, col = view.amax(dim=1).max(dim=1)  # [b]
    row = view.gather(2, col[:, None, None].expand(b, groups, 1)).squeeze(2).argmax(dim=1)
    return best, row * (n // groups) + col


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (a zero residual or a zero direction: no step, no NaN)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def _dictionary(decoder: Any, b_dec: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(W_dec [n, d], b_dec [d] or None) in raw activation space, from a tensor or a decoder-like
    object: a saekit Decoder's `raw_dictionary()` (its W_dec/b_dec live in a normalized space,
    and `decode` maps back), else the object's plain `.W_dec`/`.b_dec` (e.g. a sae-lens SAE)."""
    if isinstance(decoder, Tensor):
        return decoder.detach(), None if b_dec is None else b_dec.detach()
    if callable(getattr(decoder, "raw_dictionary", None)):
        W, own_bias = decoder.raw_dictionary()
    else:
        W, own_bias = getattr(decoder, "W_dec", None), getattr(decoder, "b_dec", None)
    if not isinstance(W, Tensor):
        raise SaekitError(
            f"decoder must be a W_dec tensor [n_features, d] or have a .W_dec tensor, got {type(decoder).__name__}"
        )
    if b_dec is None:
        b_dec = own_bias
    return W.detach(), None if b_dec is None else b_dec.detach()


def _prepare(x: Tensor, W: Tensor, b_dec: Tensor | None, k: int, method: str) -> tuple[Tensor, tuple[int, ...]]:
    """Validate; return x - b_dec as float32 [B, d] on W's device, and x's leading shape."""
    if method not in _UPDATES:
        raise SaekitError(f"unknown pursuit method {method!r}; use one of {', '.join(METHODS)}")
    if W.ndim != 2:
        raise SaekitError(f"W_dec must be [n_features, d], got shape {tuple(W.shape)}")
    n, d = W.shape
    if x.shape[-1:] != (d,):
        raise SaekitError(
            f"activations have width {x.shape[-1] if x.ndim else 0} but the dictionary has "
            f"d={d}; use the dictionary trained on this hook"
        )
    check_k(k, n)
    xc = x.detach().to(W.device, torch.float32).reshape(-1, d)
    if b_dec is not None:
        xc = xc - b_dec.to(W.device, torch.float32)
    return xc, tuple(x.shape[:-1])


def _unit_rows(W: Tensor) -> tuple[Tensor, Tensor]:
    """W: [n, d] -> (float32 unit-norm rows [n, d], norms [n]); zero rows stay zero."""
    W = W.float()
    norms = W.norm(dim=1)
    return W / _nonzero(norms)[:, None], norms


def _default_chunk_rows(n: int, d: int, k: int, method: str) -> int:
    row_bytes = 4 * n  # the [rows, n] correlation
    if method == "omp":
        row_bytes += 8 * k * (d + k)  # float64 gathered atoms [k, d] and Gram matrix [k, k]
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // row_bytes)


def _nonzero(t: Tensor) -> Tensor:
    return torch.where(t > 0, t, 1.0)


def _rescale(codes: SparseCodes, norms: Tensor) -> SparseCodes:
    """Codes over unit atoms -> codes over the original atoms (same reconstruction)."""
    return SparseCodes(codes.indices, codes.values / _nonzero(norms)[codes.indices])


@torch.no_grad()
def _run(
    x: Tensor,
    decoder: Any,
    k: int,
    method: str,
    *,
    b_dec: Tensor | None,
    chunk_size: int | None,
    dense: bool | None,
) -> SparseCodes | Tensor:
    W, bias = _dictionary(decoder, b_dec)
    xc, lead = _prepare(x, W, bias, k, method)
    n, d = W.shape
    W_unit, norms = _unit_rows(W)
    rows = chunk_size or _default_chunk_rows(n, d, k, method)
    parts = [_pursue_chunk(chunk, W_unit, k, method) for chunk in xc.split(rows)]
    if parts:
        codes = SparseCodes(*(torch.cat(p) for p in zip(*parts)))
    else:
        codes = SparseCodes(xc.new_zeros(0, k, dtype=torch.long), xc.new_zeros(0, k))
    codes = _rescale(codes, norms)
    codes = SparseCodes(codes.indices.reshape(*lead, k), codes.values.reshape(*lead, k))
    if dense is None:
        dense = not isinstance(decoder, Tensor)
    return to_dense(codes, n).to(W.dtype) if dense else codes

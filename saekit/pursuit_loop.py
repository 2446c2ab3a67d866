"""The one greedy loop behind every pursuit in `saekit.pursuit`, and what it is made of.

    for each of k iterations: correlate the residual with every atom (one [b, d] x [d, n] matmul),
    select an atom, update the selected coefficients (one update per method: gp, cgp, mp, omp),
    back off a step that would raise the residual, stop a row once nothing is left to explain

Also the sparse-code type (`SparseCodes`), the one decode from indices (`decode_sparse`) and the
helpers the encoder-started encodings share (`_nnls`, `_dictionary`, `_prepare`, ...). Public
names are re-exported by `saekit.pursuit`, which is where users import them from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.config import check_k
from saekit.errors import SaekitError

Method = Literal["gp", "cgp", "mp", "omp"]
"""A pursuit method: what `pursuit(method=...)` takes (`METHODS`)."""

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
    method: Method,
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
METHODS: tuple[Method, ...] = ("gp", "cgp", "mp", "omp")
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


def _prepare(x: Tensor, W: Tensor, b_dec: Tensor | None, k: int, method: Method) -> tuple[Tensor, tuple[int, ...]]:
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


def _default_chunk_rows(n: int, d: int, k: int, method: Method) -> int:
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
    method: Method,
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

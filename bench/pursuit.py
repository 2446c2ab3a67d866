"""Benchmark saekit's gradient pursuit against its baselines, on the same inputs in one run.

    python bench/pursuit.py            # d=768, n=24576, k=64, b=1024 (minutes on 2 CPU cores)
    python bench/pursuit.py --k 16 --batch 256 --threads 1
    python bench/pursuit.py --small    # d=256, n=4096, k=32, b=512 (seconds)
    python bench/pursuit.py --device cuda

Prints ratios, each against a baseline timed in the same run (interleaved, best of --repeats):
- the original sae-kit's gradient pursuit (`saekit.pursuit.original_gradient_pursuit`: dense,
  3 [b, n]-sized matmuls per iteration) / saekit GP: the headline (target >= 3, the most one
  matmul per iteration instead of three can give)
- the dense reference GP (saekit's algorithm with dense [b, n] weights) / saekit GP
- saekit GP / k bare [b, d] x [d, n] fp32 matmuls, the floor for any k-step pursuit (target <= 1.3)
- sae-lens's MatchingPursuitSAE at k iterations / saekit GP, and the FVU of each.

The data: a random unit-norm dictionary; x = planted nonnegative k-sparse codes (magnitudes
spread over [1, 16]) + Gaussian noise at 10% of the signal norm + an offset b_dec.

`dense_reference_gp` lives here (and the tests check saekit against it) so the second baseline
is a tested implementation of the same algorithm.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saekit.pursuit import (  # noqa: E402
    BACKTRACK_STEPS,
    STOP_TOLERANCE,
    SparseCodes,
    conjugate_gradient_pursuit,
    gradient_pursuit,
    matching_pursuit,
    original_gradient_pursuit,
    orthogonal_pursuit,
    reconstruct,
)


@torch.no_grad()
def dense_reference_gp(x: torch.Tensor, W: torch.Tensor, k: int) -> torch.Tensor:
    """saekit's gradient pursuit written with dense [b, n] weights (the tests check that the two
    agree): the original formulation (`saekit.pursuit.original_gradient_pursuit`) plus saekit's
    rules: a new atom is added only when its correlation is above the noise tolerance, the
    step uses the projected gradient (a coefficient at 0 with a negative gradient stays put),
    a clamped step that would increase the residual is halved, and a row stops once no
    projected gradient exceeds the tolerance.

    x: [b, d] float32 (already centred); W: [n, d] unit rows -> weights [b, n]
    """
    b, n = x.shape[0], W.shape[0]
    weights = x.new_zeros(b, n)
    selected = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    tol = STOP_TOLERANCE * x.norm(dim=1)
    residual = x.clone()
    for _ in range(k):
        inner = residual @ W.T  # [b, n]
        best, j = inner.max(dim=1)
        add = (~done & (best > tol)).nonzero().squeeze(1)
        selected[add, j[add]] = True  # an atom already selected stays selected
        grad = inner * (selected & ((weights > 0) | (inner > 0)))  # projected, zero off the support
        done |= torch.maximum(grad.abs().amax(dim=1), best) <= tol
        grad *= (~done)[:, None]
        image = grad @ W  # [b, d]: the dense [b, n] x [n, d] product saekit avoids
        den = (image * image).sum(1)
        step = torch.where(den > 0, (image * residual).sum(1) / den.clamp_min(1e-30), 0.0)
        limit = (residual * residual).sum(1)
        new_weights, new_residual = weights, residual
        pending = torch.ones(b, dtype=torch.bool, device=x.device)
        for _ in range(BACKTRACK_STEPS + 1):
            cand = (weights + step[:, None] * grad).clamp_min(0)
            cand_residual = x - cand @ W  # [b, n] x [n, d] again
            ok = pending & ((cand_residual * cand_residual).sum(1) <= limit)
            new_weights = torch.where(ok[:, None], cand, new_weights)
            new_residual = torch.where(ok[:, None], cand_residual, new_residual)
            pending &= ~ok
            if not pending.any():
                break
            step = step * 0.5
        weights, residual = new_weights, new_residual
    return weights


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - recon||^2 / sum ||x - mean(x)||^2."""
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def make_inputs(d: int, n: int, k: int, b: int, seed: int, device: str):
    """(x [b, d], W [n, d] unit rows, b_dec [d]) with planted k-sparse structure + noise.

    Drawn on `device` (the argsort of a [b, n] matrix takes seconds on the CPU at GPU sizes), so
    a seed gives other inputs on another device."""
    g = torch.Generator(device).manual_seed(seed)
    W = torch.randn(n, d, generator=g, device=device)
    W /= W.norm(dim=1, keepdim=True)
    idx = torch.rand(b, n, generator=g, device=device).argsort(dim=1)[:, :k]
    val = 2 ** (4 * torch.rand(b, k, generator=g, device=device))
    signal = reconstruct(SparseCodes(idx, val), W)
    noise = torch.randn(b, d, generator=g, device=device)
    noise *= 0.1 * signal.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    b_dec = torch.randn(d, generator=g, device=device)
    x = signal + noise + b_dec
    return x, W, b_dec


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def sae_lens_mp(W: torch.Tensor, b_dec: torch.Tensor, k: int):
    """sae-lens's MatchingPursuitSAE set to exactly k iterations (no early stopping)."""
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig

    n, d = W.shape
    cfg = MatchingPursuitSAEConfig(
        d_in=d,
        d_sae=n,
        dtype="float32",
        device=str(W.device),
        apply_b_dec_to_input=True,
        residual_threshold=0.0,
        max_iterations=k,
        stop_on_duplicate_support=False,
    )
    sae = MatchingPursuitSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.b_dec.copy_(b_dec)
    return sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="d=256, n=4096, k=32, b=512")
    p.add_argument("--k", type=int, default=0, help="iterations (0: 64, or 32 with --small)")
    p.add_argument("--batch", type=int, default=0, help="rows (0: 1024, or 512 with --small)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, n, k, b = (256, 4096, 32, 512) if args.small else (768, 24576, 64, 1024)
    k, b = args.k or k, args.batch or b
    dev = args.device
    torch.manual_seed(args.seed)
    x, W, b_dec = make_inputs(d, n, k, b, args.seed, dev)
    xc = x - b_dec
    sae = sae_lens_mp(W, b_dec, k)
    buf = x.new_empty(b, n)

    def floor() -> None:
        for _ in range(k):
            torch.mm(xc, W.T, out=buf)

    runs: dict[str, Callable[[], object]] = {
        "matmul floor": floor,
        "saekit gp": lambda: gradient_pursuit(x, W, k, b_dec=b_dec, chunk_size=b),
        "original gp": lambda: original_gradient_pursuit(x, W, k, b_dec=b_dec),
        "dense ref gp": lambda: dense_reference_gp(xc, W, k),
        "saekit mp": lambda: matching_pursuit(x, W, k, b_dec=b_dec, chunk_size=b),
        "sae-lens mp": lambda: sae.encode(x),
        "saekit cgp": lambda: conjugate_gradient_pursuit(x, W, k, b_dec=b_dec, chunk_size=b),
    }
    if args.small:  # the NNLS refit is the slow option: only at the small size
        runs["saekit omp"] = lambda: orthogonal_pursuit(x, W, k, b_dec=b_dec, chunk_size=b)
    best: dict[str, float] = {name: float("inf") for name in runs}
    outs: dict[str, object] = {}
    for _ in range(args.repeats):  # interleaved, so background load hits every entry alike
        for name, fn in runs.items():
            with torch.no_grad():
                secs, outs[name] = timed(fn, dev)
            best[name] = min(best[name], secs)

    fvus = {name: fvu(x, reconstruct(out, W, b_dec)) for name, out in outs.items() if name.startswith("saekit")}
    fvus["original gp"] = fvu(xc, outs["original gp"] @ W)
    fvus["dense ref gp"] = fvu(xc, outs["dense ref gp"] @ W)
    fvus["sae-lens mp"] = fvu(x, sae.decode(outs["sae-lens mp"]).detach())
    gp = best["saekit gp"]
    print(
        f"device={dev} threads={torch.get_num_threads()} d={d} n={n} k={k} b={b} "
        f"repeats={args.repeats} torch={torch.__version__}"
    )
    for name, secs in best.items():
        extra = f"  fvu {fvus[name]:.5f}" if name in fvus else ""
        print(f"  {name:<14} {secs:8.3f} s{extra}")
    print(f"original gp / saekit gp     = {best['original gp'] / gp:5.2f}x  (target >= 3)")
    print(f"dense ref gp / saekit gp    = {best['dense ref gp'] / gp:5.2f}x")
    print(f"saekit gp / matmul floor    = {gp / best['matmul floor']:5.2f}   (target <= 1.3)")
    print(f"sae-lens mp / saekit gp     = {best['sae-lens mp'] / gp:5.2f}x")
    print(f"sae-lens mp / saekit mp     = {best['sae-lens mp'] / best['saekit mp']:5.2f}x")
    rel = abs(fvus["saekit gp"] - fvus["dense ref gp"]) / fvus["dense ref gp"]
    print(
        f"fvu: gp {fvus['saekit gp']:.5f} vs original {fvus['original gp']:.5f} and dense ref "
        f"{fvus['dense ref gp']:.5f} (rel diff {rel:.1e}); sae-lens mp {fvus['sae-lens mp']:.5f}"
    )


if __name__ == "__main__":
    main()

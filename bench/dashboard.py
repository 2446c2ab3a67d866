"""`saekit dashboard`'s pass over the rows against the bare encoder forward over the same rows.

    python bench/dashboard.py                                  # 65536 rows x 768, 16384 latents, k 32
    python bench/dashboard.py --rows 4096 --d 64 --n-features 512 --k 8 --pages 20   # quick

On a store of random rows (speed does not depend on the values) with a random TopK SAE:
  bare       `sae.encode` (the SAE's own forward) over every batch of `iter_rows`: what the pass
             cannot beat
  dashboard  `saekit.dashboard.stream_stats`: the same encoder output, kept sparse, plus each latent's count,
             max, histogram, bounded top-N and sample (the statistics the pages are built from)
  pages      `latent_pages` + the site's HTML for --pages latents (no model: token ids), per latent
Prints rows/s of both, dashboard/bare (target <= 1.5), and the projected time for 1M rows x
16384 latents (the pass at the measured rate, plus a page per latent; target < 10 minutes on 2
cores). Timings are best of --repeat interleaved runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.dashboard import DashboardConfig, latent_pages, stream_stats  # noqa: E402
from saekit.dashboard.html import latent_html  # noqa: E402
from saekit.sae import SparseAutoencoder  # noqa: E402
from saekit.store import create_store, open_store  # noqa: E402

HOOK = "blocks.0.hook_resid_pre"
TARGET_ROWS, TARGET_LATENTS = 1_000_000, 16384


def make_store(root: Path, n: int, d: int, ctx: int = 128) -> Path:
    w = create_store(root, {HOOK: d}, n_rows=n, meta={"bench": True}, overwrite=True)
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, 16384):
        m = min(16384, n - s)
        rows = torch.arange(s, s + m)
        w.append({HOOK: torch.randn(m, d, generator=g)}, torch.randint(0, 50000, (m,), generator=g), rows % ctx)
    w.finalize()
    return root


def bare(store, sae, rows: range, batch: int) -> None:
    with torch.no_grad():
        for x in store.iter_rows(HOOK, batch, rows.start, rows.stop):
            sae.encode(x.float())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n-features", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--pages", type=int, default=200)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(make_store(Path(tmp) / "store", args.rows, args.d))
        torch.manual_seed(0)
        sae = SparseAutoencoder(d_in=args.d, n_features=args.n_features, k=args.k).eval()
        rows = range(0, args.rows)
        cfg = DashboardConfig(store=tmp, sae="bench", out=tmp, batch_size=args.batch_size, progress=False)
        times: dict[str, float] = {}
        stats = None
        for _ in range(args.repeat):
            t = time.perf_counter()
            bare(store, sae, rows, args.batch_size)
            times["bare"] = min(times.get("bare", 1e9), time.perf_counter() - t)
            t = time.perf_counter()
            stats = stream_stats(cfg, store, HOOK, sae, rows, None, torch.device("cpu"))
            times["dashboard"] = min(times.get("dashboard", 1e9), time.perf_counter() - t)
        chosen = list(range(min(args.pages, args.n_features)))
        t = time.perf_counter()
        pages, _ = latent_pages(cfg, store, sae, stats, ["encoder"], rows, chosen, None, "bench: no model")
        html = [latent_html(pg, "", set(chosen)) for pg in pages]
        per_page = (time.perf_counter() - t) / len(chosen)
    rate = {name: args.rows / s for name, s in times.items()}
    for name in ("bare", "dashboard"):
        print(f"{name:>9}: {rate[name]:,.0f} rows/s ({times[name]:.2f} s for {args.rows} rows)")
    print(f"pages: {per_page * 1e3:.1f} ms per latent page ({sum(map(len, html)) / len(html) / 1e3:.0f} kB each)")
    print(f"dashboard/bare time: {times['dashboard'] / times['bare']:.2f} (target <= 1.5)")
    projected = TARGET_ROWS / rate["dashboard"] * (TARGET_LATENTS / args.n_features) + TARGET_LATENTS * per_page
    print(
        f"projected 1M rows x {TARGET_LATENTS} latents (k {args.k}, d {args.d}): {projected / 60:.1f} min "
        "(target < 10 min on 2 cores)"
    )


if __name__ == "__main__":
    main()

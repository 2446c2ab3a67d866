"""Benchmark the activation cache against an in-RAM memcpy ceiling measured in the same run.

    .venv/bin/python bench/store.py                 # 700k x 768 bf16 = 1.07 GB in a temp dir
    .venv/bin/python bench/store.py --rows 100000   # quick

Prints GB/s and the ratio to memcpy for: write, sequential read (memmap vs zarr-python), shuffled
minibatches warm and after dropping the page cache (memmap vs zarr-python block reads), and naive
random-row reads through zarr `oindex`. Targets (2-core machine): sequential >= 0.7x memcpy,
shuffled warm >= 0.15x memcpy and >= 2x zarr-python shuffled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zarr  # imported up front so the write timing excludes it

from saekit.store import create_store, open_store
from saekit.store.format import ACTS
from saekit.store.shuffle import shuffle_plan

HOOK = "blocks.8.hook_resid_pre"


class Result(NamedTuple):
    name: str
    gbps: float
    note: str = ""


def timed(fn: Callable[[], int], repeat: int = 1) -> float:
    """Best GB/s over `repeat` runs of fn (which returns the bytes it moved)."""
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        nbytes = fn()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def make_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows as bf16 bits, uint16 [n, d] (generated in blocks to keep memory flat)."""
    g = torch.Generator().manual_seed(seed)
    out = np.empty((n, d), np.uint16)
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        out[s:e] = torch.randn(e - s, d, generator=g).bfloat16().view(torch.int16).numpy().view(np.uint16)
    return out


def drop_page_cache(root: Path, system: bool = True) -> str:
    """Evict the store's pages: /proc/sys/vm/drop_caches if root (and `system`), else
    posix_fadvise(DONTNEED) on the store's files only."""
    os.sync()  # dirty pages cannot be dropped
    if system:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "drop_caches"
        except OSError:
            pass
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise(DONTNEED)"


def consume_sequential(batches, dst: np.ndarray) -> int:
    """Copy each batch into a reused buffer (a consumer's minimum work). -> bytes moved."""
    n = 0
    for b in batches:
        u = b.view(torch.int16).numpy()
        np.copyto(dst[: len(u)], u)
        n += u.nbytes
    return n


def consume_shuffled(batches) -> int:
    return sum(b.numel() * 2 for b in batches)  # each batch is a fresh gathered array


def zarr_sequential(arr, dst: np.ndarray) -> int:
    """The baseline: consecutive 65,536-row reads straight through zarr-python. -> bytes moved."""
    n = 0
    for s in range(0, arr.shape[0], 65536):
        u = np.asarray(arr[s : s + 65536]).view(np.int16)
        np.copyto(dst[: len(u)], u)
        n += u.nbytes
    return n


def zarr_shuffled(arr, chunk_rows: int, batch: int, seed: int) -> int:
    """The baseline: saekit's shuffle plan (same blocks, same windows), each block read through
    zarr-python, rows gathered with numpy. -> bytes moved."""
    n = 0
    for w in shuffle_plan(arr.shape[0], chunk_rows, seed=seed, epoch=0, rank=0, world_size=1, window_blocks=16):
        rows = np.concatenate([np.asarray(arr[a:b]) for a, b in w.blocks])
        perm = w.row_perm()
        for s in range(0, perm.size, batch):
            n += np.take(rows, perm[s : s + batch], axis=0).nbytes
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=700_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch", type=int, default=4096, help="shuffled minibatch rows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the warm reads (best kept)")
    ap.add_argument("--dir", default=None, help="where to put the temporary store (default: $TMPDIR)")
    ap.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="cold reads: evict only the store's files (posix_fadvise), not the whole page cache",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-", dir=args.dir))
    root = tmp / "store"
    try:
        run(args, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, root: Path) -> None:
    n, d = args.rows, args.d
    data = make_rows(n, d)
    print(
        f"data: {n:,} x {d} bf16 = {data.nbytes / 1e9:.2f} GB; torch threads {torch.get_num_threads()}; store in {root}"
    )
    buf = np.empty((65536, d), np.int16)
    in_ram = [torch.from_numpy(data[s : s + 65536].view(np.int16)).view(torch.bfloat16) for s in range(0, n, 65536)]

    def write() -> int:
        w = create_store(root, {HOOK: d}, n_rows=n, meta={"bench": True}, overwrite=True)
        for s in range(0, n, 8192):
            rows = torch.from_numpy(data[s : s + 8192].view(np.int16)).view(torch.bfloat16)
            w.append({HOOK: rows}, np.zeros(len(rows)), np.zeros(len(rows)))
        w.finalize()
        return data.nbytes

    first_write = timed(write)  # new files: includes the kernel's first-touch costs
    results = [
        Result(
            "write (append+finalize)",
            max(first_write, timed(write)),
            f"best of 2 (first {first_write:.2f}); page cache, no fsync; incl. crc32c + stats",
        )
    ]

    st = open_store(root)
    arr = zarr.open_array(str(root / ACTS / HOOK), mode="r")  # the baseline reads zarr-python directly
    chunk_rows = st.layout.chunk_rows
    results.append(
        Result(
            "sequential memmap, first touch",
            timed(lambda: consume_sequential(st.iter_rows(HOOK, 65536), buf)),
            "warm page cache; incl. per-shard crc32c check",
        )
    )
    warm = {
        # the ceiling: the same consumer as the sequential reads, fed from an in-RAM array
        "memcpy (in-RAM ceiling)": lambda: consume_sequential(in_ram, buf),
        "sequential memmap": lambda: consume_sequential(st.iter_rows(HOOK, 65536), buf),
        "sequential zarr-python": lambda: zarr_sequential(arr, buf),
        "shuffled memmap": lambda: consume_shuffled(st.shuffled_batches(HOOK, args.batch, seed=0)),
        "shuffled zarr-python (same blocks)": lambda: zarr_shuffled(arr, chunk_rows, args.batch, seed=0),
    }
    best = dict.fromkeys(warm, 0.0)
    for _ in range(args.rounds):  # interleaved: load from other work on the machine hits every figure alike
        for k, fn in warm.items():
            best[k] = max(best[k], timed(fn))
    results += [
        Result(k, v, f"warm, best of {args.rounds}" + (f", batch {args.batch}" if "shuffled" in k else ""))
        for k, v in best.items()
    ]

    rng = np.random.default_rng(0)

    def zarr_random() -> int:  # the naive way: random rows through zarr's orthogonal indexing
        return sum(
            np.asarray(arr.oindex[np.sort(rng.choice(n, args.batch, replace=False)), :]).nbytes for _ in range(3)
        )

    results.append(Result("random rows zarr oindex", timed(zarr_random), f"warm, 3 batches of {args.batch}"))

    for name, consume in (
        (
            "shuffled memmap, cold",
            lambda: consume_shuffled(open_store(root).shuffled_batches(HOOK, args.batch, seed=1)),
        ),
        (
            "shuffled zarr-python, cold",
            lambda: zarr_shuffled(zarr.open_array(str(root / ACTS / HOOK), mode="r"), chunk_rows, args.batch, seed=1),
        ),
        ("sequential memmap, cold", lambda: consume_sequential(open_store(root).iter_rows(HOOK, 65536), buf)),
    ):
        how = drop_page_cache(root, system=not args.no_drop_caches)
        results.append(Result(name, timed(consume), how + ("; incl. crc" if "memmap" in name else "")))

    memcpy = best["memcpy (in-RAM ceiling)"]
    print(f"\n{'measurement':<36} {'GB/s':>7} {'x memcpy':>9}  note")
    for r in sorted(results, key=lambda r: r.name != "memcpy (in-RAM ceiling)"):
        print(f"{r.name:<36} {r.gbps:7.2f} {r.gbps / memcpy:9.3f}  {r.note}")
    seq, shuf, zshuf = best["sequential memmap"], best["shuffled memmap"], best["shuffled zarr-python (same blocks)"]
    print(
        f"\ntargets: sequential >= 0.7x memcpy: {seq / memcpy:.2f}x; shuffled warm >= 0.15x memcpy: {shuf / memcpy:.2f}x;"
        f" shuffled >= 2x zarr-python: {shuf / zshuf:.1f}x"
    )


if __name__ == "__main__":
    main()

"""Shared fixtures. Keep them small: the whole suite runs on 2 CPU cores."""

import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory) -> Path:
    """A store harvested from the embedded default model and corpus: 32,768 rows of
    blocks.2.hook_resid_pre (d_model 128), small shards so shuffling has blocks to permute."""
    from saekit.harvest import HarvestConfig, run

    out = tmp_path_factory.mktemp("embedded") / "store"
    run(HarvestConfig(out=str(out), tokens=32768, shard_rows=16384, chunk_rows=1024, device="cpu", progress=False))
    return out


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Every tensor in the suite is small: a second intra-op thread only adds wake-up waits, and on a
    # busy 2-core machine it spin-waits for a core another process holds (tiny ops get 10-50x slower).
    import os

    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a fresh directory with a real tmpfs of `size` bytes mounted on it
    (a real full disk, a real read-only file system); `remount(path, size)` grows one. Unmounted
    at teardown. Skips without the right to mount."""
    mounted = []

    def mount(size: int, ro: bool = False) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"needs root to mount a tmpfs ({r.stderr.strip()})")
        mounted.append(where)
        return where

    def remount(where: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    mount.remount = remount
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

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
def own_shard_cache(tmp_path_factory):
    """Remote stores read in the tests cache their shards here, never in the user's ~/.cache
    (subprocesses inherit it); a test that checks the cache passes --cache-dir of its own."""
    import os

    old = os.environ.get("SAEKIT_SHARD_CACHE")
    os.environ["SAEKIT_SHARD_CACHE"] = str(tmp_path_factory.mktemp("shard-cache"))
    yield
    if old is None:
        os.environ.pop("SAEKIT_SHARD_CACHE", None)
    else:
        os.environ["SAEKIT_SHARD_CACHE"] = old


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on localhost: moto's standalone server (`moto[server]`), a separate
    process speaking the S3 protocol over HTTP. Points the standard AWS environment at it (as a
    user would for MinIO), so saekit and any subprocess reach it the way they reach real S3."""
    import os
    import sys

    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e .)")
    sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
    from remote_copy import AWS_TEST_ENV, start_s3_server  # the benches start the same server

    old = {k: os.environ.get(k) for k in (*AWS_TEST_ENV, "AWS_ENDPOINT_URL")}
    proc = start_s3_server(tmp_path_factory.mktemp("moto") / "server.log")
    yield os.environ["AWS_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket on the local S3 server: returns 's3://<bucket>'."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{id(request) % 10**6}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"

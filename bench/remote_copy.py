"""`saekit copy` to and from S3 against a plain object-store client copying the same objects.

    python bench/remote_copy.py                  # a 128 MB store, 8 threads, best of 2
    python bench/remote_copy.py --mb 512 --threads 16

Starts moto's S3 server on localhost (as tests/conftest.py does: a separate process speaking the
S3 protocol over HTTP), writes a store of about --mb MB of synthetic bf16 rows, then times, each
direction in interleaved rounds (best kept), on the same number of threads:
  upload    saekit copy DIR s3://bench/up-N     vs  boto3 upload_file of every file of the store
  download  saekit copy s3://bench/up-0 DIR-N   vs  boto3 download_file of every object of it
The plain client moves one file per thread (TransferConfig(use_threads=False)), so both sides
run --threads transfers at once. saekit also checks every shard's crc32c (the source before an
upload, each download after it lands) and writes the group zarr.json last; the plain client
checks nothing. Prints MB/s of each and the ratio saekit / plain client (throughput) per direction.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.store import create_store  # noqa: E402
from saekit.store.copy import CopyConfig, copy_store  # noqa: E402

HOOK = "blocks.8.hook_resid_pre"
BUCKET = "bench"


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3_server(log: Path) -> subprocess.Popen:
    """moto's S3 server on a free localhost port (a separate process speaking S3 over HTTP); points
    the standard AWS environment at it, as a user would for MinIO. tests/conftest.py uses it too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=f
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
    os.environ.update(AWS_TEST_ENV, AWS_ENDPOINT_URL=url)
    return proc


def make_store(root: Path, mb: float, d: int, shard_rows: int) -> int:
    """A complete store of about `mb` MB of Gaussian bf16 rows; returns its bytes on disk."""
    n = max(1, int(mb * 1e6 / (2 * d + 8)))
    w = create_store(root, {HOOK: d}, n_rows=n, meta={"bench": "remote_copy"}, shard_rows=shard_rows, chunk_rows=256)
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, 16384):
        m = min(16384, n - s)
        w.append({HOOK: torch.randn(m, d, generator=g)}, torch.zeros(m, dtype=torch.int32), torch.arange(m) % 128)
    w.finalize()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def saekit_copy(src: str, dst: str, threads: int) -> float:
    t = time.perf_counter()
    r = copy_store(CopyConfig(src=src, dst=dst, threads=threads, progress=False))
    assert not r.already and r.kept == 0
    return time.perf_counter() - t


def plain_client(threads: int):
    """(upload(root, prefix), download(prefix, root)) with boto3, one file per thread of a pool."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3")  # honours AWS_ENDPOINT_URL
    one = TransferConfig(use_threads=False)

    def upload(root: Path, prefix: str, names: list[str]) -> float:
        t = time.perf_counter()
        with ThreadPool(threads) as pool:
            pool.map(lambda n: s3.upload_file(str(root / n), BUCKET, f"{prefix}/{n}", Config=one), names)
        return time.perf_counter() - t

    def download(prefix: str, root: Path, names: list[str]) -> float:
        t = time.perf_counter()

        def get(n: str) -> None:
            (root / n).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, f"{prefix}/{n}", str(root / n), Config=one)

        with ThreadPool(threads) as pool:
            pool.map(get, names)
        return time.perf_counter() - t

    return s3, upload, download


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=128, help="store size in MB (synthetic rows)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--shard-rows", type=int, default=8192, help="rows per shard (8192 x 768: 12.6 MB shard files)")
    ap.add_argument("--threads", type=int, default=8, help="transfers at once, for saekit and the plain client")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds (best kept)")
    ap.add_argument("--dir", default=None, help="where to put the temporary stores (default: $TMPDIR)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-", dir=args.dir))
    server = start_s3_server(tmp / "moto.log")
    try:
        run(args, tmp)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> None:
    src = tmp / "store"
    nbytes = make_store(src, args.mb, args.d, args.shard_rows)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    print(f"store: {nbytes / 1e6:.1f} MB in {len(names)} files; {args.threads} threads; S3: moto on localhost")
    s3, upload, download = plain_client(args.threads)
    s3.create_bucket(Bucket=BUCKET)
    best = {k: float("inf") for k in ("saekit up", "plain up", "saekit down", "plain down")}
    for i in range(args.repeat):  # interleaved, so a busy moment of a shared machine hits both sides
        best["saekit up"] = min(best["saekit up"], saekit_copy(str(src), f"s3://{BUCKET}/up-{i}", args.threads))
        best["plain up"] = min(best["plain up"], upload(src, f"plain-{i}", names))
        best["saekit down"] = min(
            best["saekit down"], saekit_copy(f"s3://{BUCKET}/up-0", str(tmp / f"down-{i}"), args.threads)
        )
        best["plain down"] = min(best["plain down"], download("up-0", tmp / f"plain-down-{i}", names))
        for d in (tmp / f"down-{i}", tmp / f"plain-down-{i}"):
            assert _same_files(src, d), d
            shutil.rmtree(d)
    for what, secs in best.items():
        print(f"{what:<12} {secs:7.2f} s  {nbytes / 1e6 / secs:8.1f} MB/s")
    for way in ("up", "down"):
        ratio = best[f"plain {way}"] / best[f"saekit {way}"]
        print(f"{way + 'load':<9} saekit/plain throughput {ratio:.2f}")


def _same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        np.array_equal(np.fromfile(a / f, np.uint8), np.fromfile(b / f, np.uint8)) for f in files
    )


if __name__ == "__main__":
    main()

"""Object storage against the local disk, in one run, on a real S3 endpoint on localhost (moto's
standalone server from `moto[server]`, started here, speaking S3 over HTTP).

    .venv/bin/python bench/remote.py                 # about 10 minutes on 2 cores
    .venv/bin/python bench/remote.py --quick         # a smoke run (tests/test_bench.py)

Each line is a ratio against a baseline measured in the same run:

1. harvest:  `saekit harvest --out s3://...` rows/s ÷ the same harvest to a local folder
             (GPT-2 small's shape, random weights, blocks.8.hook_resid_pre). Target >= 0.95.
2. train:    training steps fed from `s3://` through the shard cache, once the shards are cached
             ÷ fed from the local copy (saekit's training step, bench/train.py). Target >= 0.9.
3. shuffled: shuffled batches from `s3://` while its shards download (cold cache, prefetch on)
             ÷ from the local copy, each consumed by the same training step. Target >= 0.7.
4. resume:   `--resume` of a store in the bucket whose shards are all recorded but not finalized
             (a harvest killed at its end): every recorded shard is downloaded and proved against
             its record (crc32c and statistics, recomputed from its rows) ÷ a plain boto3 download of
             the same objects; and ÷ harvesting those rows again (what resuming saves).
5. copy:     `saekit copy` throughput ÷ a plain object-store client (boto3, same threads) copying
             the same objects, upload and download.

moto keeps objects in memory and serves them from one Python process, so absolute MB/s are far
below a real S3 bucket; the ratios say what saekit adds on top of the transfer itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import remote_copy  # noqa: E402
import train as train_bench  # noqa: E402
from harvest import best_interleaved, gpt2_small_random  # noqa: E402

from saekit import texts  # noqa: E402
from saekit.harvest import HarvestConfig, run_loaded  # noqa: E402
from saekit.store import open_store  # noqa: E402
from saekit.store.copy import CopyConfig, copy_store  # noqa: E402


def bench_harvest(bucket: str, tmp: Path, tokens: int, repeat: int) -> dict:
    lm = gpt2_small_random()
    corpus = texts.load_texts(None)
    hook = "blocks.8.hook_resid_pre"
    common = dict(
        hooks=[hook], tokens=tokens, ctx_len=128, batch_size=16, progress=False, shard_rows=16384, chunk_rows=4096
    )

    def local():
        run_loaded(HarvestConfig(out=str(tmp / "h-local"), overwrite=True, **common), lm, corpus)

    def remote():
        cfg = HarvestConfig(out=f"{bucket}/h-remote", overwrite=True, staging=str(tmp / "staging"), **common)
        run_loaded(cfg, lm, corpus)

    local()  # warm-up: first-call allocations, the s3 client's connection
    t_local, t_remote = best_interleaved([local, remote], repeat)
    return {"rows": tokens, "local_rows_s": tokens / t_local, "remote_rows_s": tokens / t_remote}


def bench_reads(bucket: str, tmp: Path, rows: int, d: int, n: int, batch: int, repeat: int) -> dict:
    """Training fed from the local store, from s3:// with the shard cache warm, and from s3:// with
    a cold cache (every shard downloads while training runs, prefetch on); the same shuffled
    batches (seed 0) through saekit's training step. Also the bare batch stream (no compute)."""
    local = tmp / "r-local"
    train_bench.make_store(local, rows, d)
    url = f"{bucket}/r-remote"
    copy_store(CopyConfig(src=str(local), dst=url, progress=False))
    st = open_store(local)
    mean, msn = st.stats(train_bench.HOOK)
    warm_dir = tmp / "cache-warm"
    cold = iter(range(10**6))

    def consume(store, step) -> None:
        for x in store.shuffled_batches(train_bench.HOOK, batch, seed=0, drop_last=True):
            if step is not None:
                step(x.float())

    def runner(source: str, compute: bool):
        def go() -> None:
            step = train_bench.SaekitStep(d, n, 32, mean, msn, torch.device("cpu")) if compute else None
            if source == "local":
                store = open_store(local)
            elif source == "warm":
                store = open_store(url, cache_dir=warm_dir)
            else:  # a fresh cache folder: every shard is downloaded during the run
                store = open_store(url, cache_dir=tmp / f"cache-cold-{next(cold)}")
            consume(store, step)

        return go

    runner("warm", False)()  # fills the warm cache
    out = {}
    for compute in (True, False):
        t = best_interleaved([runner(s, compute) for s in ("local", "warm", "cold")], repeat)
        out["train" if compute else "bare"] = dict(zip(("local", "warm", "cold"), t))
    out["bytes"] = rows * d * 2
    return out


def bench_resume(bucket: str, tmp: Path, rows: int, d: int, shard_rows: int, repeat: int) -> dict:
    """The check a resume makes of every recorded shard in the bucket, against downloading them."""
    import boto3

    from saekit.store import create_store

    url, hooks = f"{bucket}/resume", {"h": d}
    kw = dict(n_rows=rows, meta={"bench": "resume"}, shard_rows=shard_rows, chunk_rows=4096)
    w = create_store(url, hooks, staging=tmp / "staging-w", **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(rows // shard_rows):
        w.append({"h": torch.randn(shard_rows, d, generator=g)}, torch.zeros(shard_rows), torch.zeros(shard_rows))
    w.close()  # every shard and its record is in the bucket; no finalize: a harvest killed at its end
    bucket_name, prefix = url[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name, Prefix=f"{prefix}/")["Contents"]]
    shard_keys = [k for k in keys if "/c/" in k]

    def resume():
        w = create_store(url, hooks, staging=tmp / "staging-r", resume=True, **kw)
        assert w.damaged == [] and w.resume_row == rows
        w.close()

    def download():
        for k in shard_keys:
            s3.get_object(Bucket=bucket_name, Key=k)["Body"].read()

    t_resume, t_download = best_interleaved([resume, download], repeat)
    nbytes = sum(
        o["Size"] for o in s3.list_objects_v2(Bucket=bucket_name, Prefix=f"{prefix}/")["Contents"] if "/c/" in o["Key"]
    )
    return {"shards": len(shard_keys), "bytes": nbytes, "resume_s": t_resume, "download_s": t_download}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = 2048 if args.quick else 32_768
    repeat = 1 if args.quick else args.repeat
    rows, d, n, batch = (8192, 64, 256, 512) if args.quick else (131_072, 768, 2048, 2048)
    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-remote-"))
    server = remote_copy.start_s3_server(tmp / "moto.log")
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=remote_copy.BUCKET)
        bucket = f"s3://{remote_copy.BUCKET}"
        print(f"S3 endpoint: moto server at {os.environ['AWS_ENDPOINT_URL']}; torch {args.threads} thread(s)")
        h = bench_harvest(bucket, tmp, tokens, repeat)
        print(
            f"harvest   local {h['local_rows_s']:>9,.0f} rows/s   s3:// {h['remote_rows_s']:>9,.0f} rows/s   "
            f"s3 ÷ local = {h['remote_rows_s'] / h['local_rows_s']:.2f}  (target >= 0.95; {h['rows']:,} rows, d 768)"
        )
        r = bench_reads(bucket, tmp, rows, d, n, batch, repeat)
        mb = r["bytes"] / 1e6
        print(
            f"reads     {rows:,} rows x {d} ({mb:.0f} MB), batch {batch}, one shuffled epoch; training step d {d}, {n} latents, k 32"
        )
        for what in ("train", "bare"):
            t = r[what]
            label = "train" if what == "train" else "bare reads (no compute)"
            print(
                f"  {label:<24} local {t['local']:6.2f} s   s3 warm {t['warm']:6.2f} s   s3 cold {t['cold']:6.2f} s   "
                f"warm ÷ local = {t['local'] / t['warm']:.2f}   cold ÷ local = {t['local'] / t['cold']:.2f}"
            )
        print("  targets: training from s3 once cached >= 0.9; shuffled batches while downloading >= 0.7")
        shard_rows = 4096 if args.quick else 16384
        z = bench_resume(bucket, tmp, 4 * shard_rows, 768, shard_rows, repeat)
        harvest_s = 4 * shard_rows / h["local_rows_s"]
        print(
            f"resume    {z['shards']} recorded shard files ({z['bytes'] / 1e6:.0f} MB) proved against their records: "
            f"{z['resume_s']:.2f} s   ÷ boto3 download of the same objects = {z['resume_s'] / z['download_s']:.2f}   "
            f"÷ harvesting those rows again = {z['resume_s'] / harvest_s:.3f}"
        )
        print("copy      (bench/remote_copy.py)")
        remote_copy.run(
            argparse.Namespace(
                mb=32 if args.quick else 256, d=768, shard_rows=8192, threads=8, repeat=1 if args.quick else 2
            ),
            tmp,
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

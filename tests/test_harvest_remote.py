"""Harvest straight into object storage, against a real S3 endpoint on localhost (moto's server):
the same store (content hash) as a local harvest, SIGKILL then --resume from what is in the bucket,
two torchrun ranks, and nothing partial ever visible as complete."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saekit.errors import SaekitError
from saekit.harvest import run
from saekit.store import open_store
from saekit.store.remote import Remote

sys.path.insert(0, str(Path(__file__).parent))
from test_harvest import HOOKS, REPO, cfg_for, make_data  # noqa: E402

TOKENS = 20_000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("harvest"))


def cli_args(data, out: str, staging: Path, *extra: str) -> list[str]:
    _, ckpt, texts = data
    hooks = sum((["--hook", h] for h in HOOKS), [])
    sizes = ["--ctx-len", "32", "--batch-size", "8", "--shard-rows", "256", "--chunk-rows", "64"]
    return [
        "harvest", "--model", ckpt, "--dataset", texts, *hooks, "--out", out, "--tokens", str(TOKENS),
        *sizes, "--device", "cpu", "--staging", str(staging), "--no-progress", *extra,
    ]  # fmt: skip


def env() -> dict:
    # read now: the s3_server fixture has pointed the AWS environment at the local server
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }


def records_in(remote: Remote) -> int:
    return len(remote.list(".saekit-shards"))


@pytest.mark.slow
def test_harvest_to_s3_killed_then_resumed_equals_local(data, s3_bucket, tmp_path):
    want = run(cfg_for(data, tmp_path / "local", tokens=TOKENS)).content_hash
    url = f"{s3_bucket}/caches/gpt2"
    remote = Remote(url)
    cmd = [sys.executable, "-m", "saekit.cli.main", *cli_args(data, url, tmp_path / "staging")]
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while records_in(remote) < 10 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = records_in(remote)
    assert 10 <= done < 79, done  # killed part way (20,000 rows = 79 shards)
    # Nothing partial is visible as complete: the bucket holds an incomplete store.
    with pytest.raises(SaekitError, match="incomplete"):
        open_store(url)
    attrs = json.loads(remote.read_bytes("zarr.json"))["attributes"]
    assert attrs["complete"] is False
    # Every recorded shard has all its objects (the record is written after them).
    names = remote.list()
    for r in remote.list(".saekit-shards"):
        i = int(r.split("-")[-1].split(".")[0])
        assert f"tokens/c/{i}" in names and f"acts/{HOOKS[0]}/c/{i}/0" in names
    # A finished shard lost from the bucket while nothing ran: resume finds and redoes it.
    remote.remove([f"tokens/c/{2}"])
    r = subprocess.run(cmd + ["--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "redoing a damaged shard (tokens/c/2: missing)" in r.stderr
    assert want in r.stdout
    store = open_store(url)
    assert store.content_hash == want and store.n_rows == TOKENS
    assert store.verify() == []
    # resuming a finished store in the bucket: nothing to do
    r = subprocess.run(cmd + ["--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stderr, r.stderr[-2000:]
    # staging holds nothing once the store is published
    assert not any(p.is_file() for p in (tmp_path / "staging").rglob("*"))


@pytest.mark.slow
def test_harvest_to_s3_with_two_ranks_equals_local(data, s3_bucket, tmp_path):
    want = run(cfg_for(data, tmp_path / "local", tokens=5000)).content_hash
    url = f"{s3_bucket}/two-ranks"
    args = cli_args(data, url, tmp_path / "staging")
    args[args.index("--tokens") + 1] = "5000"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(
        [*torchrun, "-m", "saekit.cli.main", *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert open_store(url).content_hash == want
    assert not any(p.is_file() for p in (tmp_path / "staging").rglob("*"))  # every rank's staging is freed


@pytest.mark.slow
def test_harvest_to_a_url_it_cannot_honour_is_one_line(data, s3_server, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "saekit.cli.main", *cli_args(data, "s3://no-such-bucket/x", tmp_path / "st")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and lines[-1].startswith("error: ") and "no-such-bucket" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr

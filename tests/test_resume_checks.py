"""A resumed store keeps a finished shard only once its rows prove its record: the crc32c of every
array and the statistics, recomputed from the rows (locally and in a bucket). A damaged shard or an
edited record is redone, so the finished store verifies and its statistics are its rows'."""

import json
import os

import boto3
import numpy as np
import pytest
import torch

from saekit.store import create_store, open_store
from saekit.store.shards import RECORDS_DIR

HOOKS = {"h": 8}
N, SHARD = 128, 32


def _rows(lo: int, hi: int) -> dict:
    g = torch.Generator().manual_seed(lo)
    return {"h": torch.randn(hi - lo, 8, generator=g)}


def _all_rows() -> dict:
    return _rows(0, N)


def _fresh(path) -> str:
    w = create_store(path, HOOKS, n_rows=N, meta={"m": 1}, shard_rows=SHARD, chunk_rows=16)
    w.append(_all_rows(), torch.arange(N), torch.arange(N))
    return w.finalize()["content_hash"]


def _killed_then_resumed(path, damage, **kw) -> str:
    """Half the rows written, the writer gone (killed), `damage(path)`, then a resume to the end."""
    w = create_store(path, HOOKS, n_rows=N, meta={"m": 1}, shard_rows=SHARD, chunk_rows=16, **kw)
    w.append({"h": _all_rows()["h"][: N // 2]}, torch.arange(N // 2), torch.arange(N // 2))
    w._flush()  # the shards are on disk with their records; the process dies here
    del w
    damage(path)
    w = create_store(path, HOOKS, n_rows=N, meta={"m": 1}, shard_rows=SHARD, chunk_rows=16, resume=True, **kw)
    s = w.resume_row
    w.append({"h": _all_rows()["h"][s:]}, torch.arange(s, N), torch.arange(s, N))
    return w.finalize()["content_hash"]


def _edit_record(read, write, field: str) -> None:
    rec = json.loads(read(f"{RECORDS_DIR}/shard-000001.json"))
    if field == "crc32c":
        rec["crc32c"]["acts/h"] ^= 1
    else:
        rec["sq_norms"]["h"] *= 2
    write(f"{RECORDS_DIR}/shard-000001.json", json.dumps(rec).encode())


@pytest.mark.parametrize("damage", ["crc32c", "sq_norms"])
def test_a_local_resume_checks_each_kept_shards_record_against_its_rows(tmp_path, damage):
    want = _fresh(tmp_path / "fresh")
    got = _killed_then_resumed(
        tmp_path / "s",
        lambda p: _edit_record(lambda n: (p / n).read_bytes(), lambda n, b: (p / n).write_bytes(b), damage),
    )
    st = open_store(tmp_path / "s")
    assert st.verify() == [] and got == want
    np.testing.assert_array_equal(st.stats("h").mean.numpy(), open_store(tmp_path / "fresh").stats("h").mean.numpy())


@pytest.mark.parametrize("damage", ["flipped byte", "crc32c", "sq_norms"])
@pytest.mark.slow
def test_a_resume_in_a_bucket_checks_each_kept_shard_against_its_rows(s3_bucket, tmp_path, damage):
    want = _fresh(tmp_path / "fresh")
    url = f"{s3_bucket}/st"
    bucket, prefix = url[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    read = lambda n: s3.get_object(Bucket=bucket, Key=f"{prefix}/{n}")["Body"].read()  # noqa: E731
    write = lambda n, b: s3.put_object(Bucket=bucket, Key=f"{prefix}/{n}", Body=b)  # noqa: E731

    def harm(_):
        if damage == "flipped byte":  # the same size: only its rows can tell
            data = bytearray(read("acts/h/c/1/0"))
            data[20] ^= 1
            write("acts/h/c/1/0", bytes(data))
        else:
            _edit_record(read, write, damage)

    got = _killed_then_resumed(url, harm, staging=tmp_path / "staging")
    assert open_store(url).verify() == [] and got == want

"""Names that come from outside (a bucket's listing, a cache directory, a store's files) never make
saekit write, read or delete outside the folder they belong to: object keys that climb out with
`..` or start a second absolute path, symlinks planted in a shared shard cache or in a store."""

import os

import boto3
import pytest
from test_cli_store import make_store

from saekit.errors import SaekitError
from saekit.store import create_store, open_store
from saekit.store.copy import CopyConfig, copy_store


def _plant(url: str, targets: list) -> None:
    """Objects under the store at `url` whose keys name each target outside it: one climbing out
    of the records folder with '..', one with a second, absolute path after a '/'."""
    bucket, prefix = url[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    climb, absolute = targets
    s3.put_object(Bucket=bucket, Key=f"{prefix}/.saekit-shards/{'../' * 40}{str(climb)[1:]}", Body=b"evil")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{absolute}", Body=b"{}")


def _targets(tmp_path) -> list:
    return [tmp_path / "outside" / "climb.json", tmp_path / "outside" / "abs" / "zarr.json"]


def _nothing_outside(tmp_path) -> None:
    assert not (tmp_path / "outside").exists(), sorted(map(str, (tmp_path / "outside").rglob("*")))


def test_copy_from_a_bucket_never_writes_outside_dst(s3_bucket, tmp_path):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/st"
    copy_store(CopyConfig(src=str(src), dst=url, progress=False))
    _plant(url, _targets(tmp_path))
    res = copy_store(CopyConfig(src=url, dst=str(tmp_path / "dst"), progress=False))
    _nothing_outside(tmp_path)
    assert open_store(res.dst).content_hash == open_store(src).content_hash


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_opening_a_store_in_a_bucket_to_write_never_writes_outside_staging(s3_bucket, tmp_path, flags):
    """create_store at a URL pulls the bucket's metadata and records into staging before it
    decides anything: even the harvest it then refuses must not write what the listing names."""
    url = f"{s3_bucket}/st"
    w = create_store(url, {"h": 4}, n_rows=64, meta={}, shard_rows=32, chunk_rows=16, staging=tmp_path / "staging")
    _plant(url, _targets(tmp_path))
    try:
        create_store(url, {"h": 4}, n_rows=64, meta={}, shard_rows=32, chunk_rows=16, staging=tmp_path / "s2", **flags)
    except SaekitError:
        pass
    del w
    _nothing_outside(tmp_path)


def _my_data(tmp_path):
    """A folder of someone's files that a symlink will point at."""
    data = tmp_path / "my-data"
    (data / "sub").mkdir(parents=True)
    for i in range(4):
        (data / f"f{i}.bin").write_bytes(os.urandom(4096))
    (data / "sub" / "g.bin").write_bytes(os.urandom(4096))
    return data


def _tree(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_shard_cache_eviction_never_follows_a_symlink_out_of_the_cache(s3_bucket, tmp_path):
    """A shared cache directory: a symlink named like a store's folder, or like a cached file,
    pointing at someone's data. Reading a store through a tiny cache evicts saekit's own files
    only; the data, and the links, stay."""
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/st"
    copy_store(CopyConfig(src=str(src), dst=url, progress=False))
    cache = tmp_path / "cache"
    open_store(url, cache_dir=cache).rows(None, 0, 1)  # the cache exists, holding one shard file
    data = _my_data(tmp_path)
    before = _tree(data)
    (cache / "0123456789abcdef").symlink_to(data)  # a whole "store folder"
    key = next(p for p in cache.iterdir() if p.is_dir() and not p.is_symlink())
    (key / "acts" / "linked.bin").symlink_to(data / "f0.bin")  # a single "cached file"
    st = open_store(url, cache_dir=cache, cache_gb=2.5 * 1100 / 2**30)  # room for about two shard files
    assert st.verify() == []
    for i in range(0, st.n_rows, 64):
        st.rows(None, i, i + 1)
    assert _tree(data) == before
    assert (cache / "0123456789abcdef").is_symlink() and (key / "acts" / "linked.bin").is_symlink()


def test_the_shard_cache_never_writes_through_a_symlink(s3_bucket, tmp_path):
    """The folder of the very store being read is a symlink to someone's data: the download is
    refused in one line, and nothing lands there."""
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/st"
    copy_store(CopyConfig(src=str(src), dst=url, progress=False))
    cache = tmp_path / "cache"
    open_store(url, cache_dir=cache).rows(None, 0, 1)
    key = next(p for p in cache.iterdir() if p.is_dir())
    data = _my_data(tmp_path)
    before = _tree(data)
    os.rename(key, tmp_path / "moved")
    key.symlink_to(data)
    with pytest.raises(SaekitError, match="symlink") as e:
        open_store(url, cache_dir=cache).rows(None, 0, 1)
    assert "\n" not in str(e.value) and _tree(data) == before


def test_copy_never_follows_a_symlink_in_the_source(s3_bucket, tmp_path):
    """A record of the source store replaced by a symlink to a secret: the copy refuses it in one
    line, and the secret never reaches the bucket."""
    src = make_store(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("the lab's credentials")
    from saekit.store.shards import RECORDS_DIR

    records = src / RECORDS_DIR
    records.mkdir(exist_ok=True)
    (records / "shard-000000.json").symlink_to(secret)
    url = f"{s3_bucket}/st"
    with pytest.raises(SaekitError, match="symlink") as e:
        copy_store(CopyConfig(src=str(src), dst=url, progress=False))
    assert "\n" not in str(e.value)
    bucket, prefix = url[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        assert b"credentials" not in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()


def _never_hangs(fn, fifos, timeout: float = 120):
    """fn() run on a thread: its result, or the exception it raised. If it is still blocked after
    `timeout` (a hang: the test fails), the FIFOs are opened for writing to set the thread free."""
    import threading

    out = {}

    def go():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:
            with open(f, "wb"):
                pass
        pytest.fail(f"{fn} blocked reading a FIFO")
    return out


@pytest.mark.parametrize(
    "fifo", ["zarr.json", "acts/blocks.3.hook_resid_post/zarr.json", ".saekit-shards/shard-000000.json"]
)
def test_a_fifo_where_a_store_keeps_a_file_is_one_line_never_a_hang(tmp_path, fifo):
    """Opening a FIFO to read waits for a writer forever: `ls ROOT`, `info` and `verify` open only
    regular files, and say what is there instead."""
    from saekit.store import list_stores

    store = make_store(tmp_path / "root" / "st", finalize=not fifo.startswith(".saekit-shards"))
    os.unlink(store / fifo)
    os.mkfifo(store / fifo)
    got = _never_hangs(lambda: list_stores(tmp_path / "root"), [store / fifo])
    assert "error" not in got, got
    [(path, summary, ok)] = got["value"]  # listed, with what is wrong
    assert path == store and not ok and "FIFO" in summary and "\n" not in summary
    for fn in (
        lambda: open_store(store, allow_incomplete=True),
        lambda: open_store(store, allow_incomplete=True).verify(),
    ):
        got = _never_hangs(fn, [store / fifo])
        assert isinstance(got.get("error"), SaekitError) and "FIFO" in str(got["error"]), got


@pytest.mark.parametrize("fifo", ["config.json", "sae.safetensors"])
def test_a_fifo_in_an_sae_directory_is_one_line_never_a_hang(tmp_path, fifo):
    from saekit.sae import SparseAutoencoder, load_sae

    sae = SparseAutoencoder(d_in=4, n_features=8, k=2).save(tmp_path / "sae")
    os.unlink(sae / fifo)
    os.mkfifo(sae / fifo)
    got = _never_hangs(lambda: load_sae(sae), [sae / fifo])
    assert isinstance(got.get("error"), SaekitError) and "FIFO" in str(got["error"]), got
    assert "\n" not in str(got["error"])

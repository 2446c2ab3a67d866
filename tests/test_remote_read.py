"""Reading a store from object storage through the local shard cache (saekit.store.shard_cache), against
a real S3 endpoint on localhost (moto's server): the same bytes as the local store, the same
training and pursuit results, damage in the bucket or in the cache never used, the size bound kept.

Uploading a local store with `Remote.put_file` is the test's setup (what `saekit copy` or a
harvest to S3 does), not the read path under test."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import in_process, one_error, saekit
from test_cli_store import HOOK, META, make_store

from saekit.errors import SaekitError
from saekit.store import create_store, open_store, shuffle_plan
from saekit.store.format import shard_files
from saekit.store.remote import Remote


def upload(local: Path, url: str) -> str:
    r = Remote(url)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            r.put_file(p, p.relative_to(local).as_posix())
    return url


def cached_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def flip(data: bytes, at: int = 100) -> bytes:
    raw = bytearray(data)
    raw[at] ^= 0xFF
    return bytes(raw)


@pytest.fixture
def stores(tmp_path, s3_bucket):
    """(local store, the same store in the bucket): 200 rows of d 8 in four shards of 64 rows."""
    local = make_store(tmp_path / "store")
    return local, upload(local, f"{s3_bucket}/store")


def batches(st, **kw):
    return [b.view(torch.int16).numpy().copy() for b in st.shuffled_batches(HOOK, 24, **kw)]


def test_reads_from_s3_equal_the_local_store_bytes(stores, tmp_path):
    local, url = stores
    a, b = open_store(local), open_store(url, cache_dir=tmp_path / "cache")
    assert (b.content_hash, b.n_rows, b.stats(HOOK).mean_sq_norm) == (a.content_hash, 200, a.stats(HOOK).mean_sq_norm)
    for kw in (dict(seed=3), dict(seed=4, epoch=1, window_blocks=2), dict(seed=5, rank=1, world_size=2)):
        assert all(np.array_equal(p, q) for p, q in zip(batches(a, **kw), batches(b, **kw), strict=True)), kw
    got = [r.view(torch.int16) for r in b.iter_rows(HOOK, 50)]
    assert torch.equal(torch.cat(got), a.rows(HOOK, 0, 200).view(torch.int16))
    assert torch.equal(b.tokens(0, 200), a.tokens(0, 200)) and torch.equal(b.positions(60, 70), a.positions(60, 70))
    assert torch.equal(b.take(HOOK, [199, 3, 64]).view(torch.int16), a.take(HOOK, [199, 3, 64]).view(torch.int16))
    assert b.verify() == []
    # the files in the cache are the bucket's objects, under the store's content hash
    key = a.content_hash.removeprefix("sha256:")[:16]
    for name in shard_files(a.layout, 2).values():
        assert (tmp_path / "cache" / key / name).read_bytes() == (local / name).read_bytes()


def test_threads_reading_one_remote_store_get_the_same_rows(stores, tmp_path):
    local, url = stores
    want = open_store(local).rows(HOOK, 0, 200).view(torch.int16)
    st = open_store(url, cache_dir=tmp_path / "cache")
    got, errors = [None] * 4, []

    def read(i):
        try:
            got[i] = torch.cat([r.view(torch.int16) for r in st.iter_rows(HOOK, 7 + i)])
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and all(torch.equal(g, want) for g in got)


def test_info_and_verify_of_an_s3_store(stores, capsys, monkeypatch):
    local, url = stores
    code, out, err = in_process(capsys, monkeypatch, "info", url)
    assert code == 0, err
    assert re.search(r"^complete\s+yes$", out, re.M)
    assert open_store(local).content_hash in out and "KiB" in out
    code, out, err = in_process(capsys, monkeypatch, "verify", url)
    assert code == 0 and out.startswith("ok: 4 shard(s), 200 rows"), err


def test_an_incomplete_s3_store_reads_its_records_from_the_bucket(tmp_path, s3_bucket, capsys, monkeypatch):
    local = make_store(tmp_path / "store", finalize=False)  # 3 full shards have records; the 4th is buffered
    url = upload(local, f"{s3_bucket}/store")
    with pytest.raises(SaekitError, match="incomplete"):
        open_store(url)
    a, b = open_store(local, allow_incomplete=True), open_store(url, allow_incomplete=True)
    assert b.n_rows == a.n_rows == 192 and not b.complete
    assert torch.equal(b.rows(HOOK, 0, 192).view(torch.int16), a.rows(HOOK, 0, 192).view(torch.int16))
    code, out, err = in_process(capsys, monkeypatch, "info", url)
    assert code == 0 and "incomplete, 192 rows" in out, err


def wait_until(ok, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while not ok() and time.monotonic() < end:
        time.sleep(0.02)
    return ok()


def test_readers_download_the_next_shards_ahead(stores, tmp_path):
    _, url = stores
    cache = tmp_path / "cache"
    st = open_store(url, cache_dir=cache)
    folder = cache / st.content_hash.removeprefix("sha256:")[:16]

    def cached(i: int) -> bool:
        return (folder / shard_files(st.layout, i)[f"acts/{HOOK}"]).is_file()

    rows = st.iter_rows(HOOK, 10)
    next(rows)  # rows of shard 0 only
    assert wait_until(lambda: cached(1) and cached(2)) and not cached(3)
    rows.close()
    # shuffled: windows of one block; a seed whose third window lies in a shard the first two do not
    # touch (the page-in thread reads only the next window; the shards of the one after are downloaded)
    shard = lambda w: w.blocks[0][0] // st.layout.shard_rows  # noqa: E731
    seed = next(s for s in range(100) if len({shard(w) for w in shuffle_plan(200, 16, seed=s, **ONE)[:3]}) == 3)
    third = shard(shuffle_plan(200, 16, seed=seed, **ONE)[2])
    for p in folder.rglob("*"):
        if p.is_file():
            p.unlink()
    batches = st.shuffled_batches(HOOK, 8, seed=seed, window_blocks=1)
    next(batches)
    assert wait_until(lambda: cached(third))
    batches.close()


ONE = dict(epoch=0, rank=0, world_size=1, window_blocks=1)


def test_a_store_growing_in_the_bucket_is_read_as_it_is_now(tmp_path, s3_bucket):
    """A harvest to S3 redoes its partial last shard on resume: a reader opening the store again
    gets the new rows, not the mapping of the old file it checked before."""
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    local, url = tmp_path / "store", f"{s3_bucket}/store"
    for stop in (100, 150):  # shard 1 has 36 rows, then 64
        w = create_store(local, {HOOK: 8}, n_rows=200, meta=META, shard_rows=64, chunk_rows=16, resume=True)
        w.append({HOOK: x[w.resume_row : stop]}, torch.arange(w.resume_row, stop), torch.arange(w.resume_row, stop))
        w.close()
        upload(local, url)
        st = open_store(url, allow_incomplete=True)
        assert st.n_rows == stop and torch.equal(st.rows(HOOK, 0, stop), x[:stop].bfloat16())


# --- train and pursue from s3:// give what they give from the local copy --------------------------


@pytest.fixture
def big_stores(tmp_path, s3_bucket):
    """(local, s3 copy) of a 1,024-row store in 16 shards."""
    local = make_store(tmp_path / "big", n=1024)
    return local, upload(local, f"{s3_bucket}/big")


def weights(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "sae").iterdir()) if p.suffix == ".safetensors"}


def test_train_and_pursue_from_s3_equal_the_local_results(big_stores, tmp_path, capsys, monkeypatch):
    local, url = big_stores
    runs = {}
    for name, store in (("local", local), ("s3", url)):
        train = ["train", "--store", store, "--out", tmp_path / f"run-{name}", "--n-features", 16, "--k", 2]
        train += ["--batch-size", 32, "--tokens", 512, "--eval-rows", 128, "--device", "cpu", "--no-progress"]
        code, _, err = in_process(capsys, monkeypatch, *train, "--cache-dir", tmp_path / "cache", "--cache-gb", 0.00001)
        assert code == 0, err
        out = tmp_path / f"pursue-{name}"
        pursue = ["pursue", "--store", store, "--sae", tmp_path / f"run-{name}", "--k", 2, "--method", "gp"]
        code, _, err = in_process(capsys, monkeypatch, *pursue, "--device", "cpu", "--no-progress", "--out", out)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        codes = {
            p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "codes.zarr").rglob("c/*") if p.is_file()
        }
        runs[name] = weights(tmp_path / f"run-{name}"), _without_timing(report), codes
    assert runs["local"][0] and runs["local"][2]
    assert runs["s3"] == runs["local"]


def _without_timing(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("seconds", "source")} for e in entries]


# --- damage in the bucket or in the cache is never used ---------------------------------------------


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_object_in_the_bucket_is_one_line_and_never_used(stores, tmp_path, damage, capsys, monkeypatch):
    local, url = stores
    name = shard_files(open_store(local).layout, 1)[f"acts/{HOOK}"]
    data = (local / name).read_bytes()
    Remote(url).write_bytes(name, flip(data) if damage == "flipped byte" else data[: len(data) // 2])
    cache = tmp_path / "cache"
    st = open_store(url, cache_dir=cache)
    assert torch.equal(st.rows(HOOK, 0, 64).view(torch.int16), open_store(local).rows(HOOK, 0, 64).view(torch.int16))
    with pytest.raises(SaekitError, match=f"{name} is corrupt in the bucket") as e:
        st.rows(HOOK, 64, 70)
    assert "\n" not in str(e.value) and f"saekit verify {url}" in str(e.value)
    with pytest.raises(SaekitError, match="corrupt in the bucket"):
        list(st.shuffled_batches(HOOK, 24, seed=0))
    assert not list(cache.rglob(name)), "a damaged download was kept in the cache"
    code, out, err = in_process(capsys, monkeypatch, "verify", url, "--cache-dir", cache)
    one_error(code, err, "1 problem(s)")
    assert f"bad: {name}: corrupt in the bucket" in out


@pytest.mark.slow
def test_a_damaged_file_in_the_cache_is_fetched_again(stores, tmp_path):
    local, url = stores
    cache = tmp_path / "cache"
    st = open_store(url, cache_dir=cache)
    st.rows(HOOK, 0, 200)
    name = shard_files(st.layout, 2)[f"acts/{HOOK}"]
    (cached,) = cache.rglob(name)
    cached.write_bytes(flip(cached.read_bytes()))  # local disk damage, found by the next process
    r = saekit("verify", url, "--cache-dir", cache)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    assert cached.read_bytes() == (local / name).read_bytes()


# --- the size bound -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cache_stays_under_its_bound(tmp_path, s3_bucket):
    local = make_store(tmp_path / "store", n=1024)  # acts: 16 shard files of 1,092 bytes
    url = upload(local, f"{s3_bucket}/store")
    shard = (local / shard_files(open_store(local).layout, 0)[f"acts/{HOOK}"]).stat().st_size
    bound = int(2.5 * shard)
    a, b = open_store(local), open_store(url, cache_dir=tmp_path / "cache", cache_gb=bound / 2**30)
    for kw in (dict(seed=1, window_blocks=2), dict(seed=2)):
        assert all(np.array_equal(p, q) for p, q in zip(batches(a, **kw), batches(b, **kw), strict=True))
        assert 0 < cached_bytes(tmp_path / "cache") <= bound
    assert torch.equal(torch.cat(list(b.iter_rows(HOOK, 100))), torch.cat(list(a.iter_rows(HOOK, 100))))
    assert b.verify() == [] and cached_bytes(tmp_path / "cache") <= bound
    # a shard file larger than the whole cache: one line saying what to raise
    with pytest.raises(SaekitError, match="raise --cache-gb") as e:
        open_store(url, cache_dir=tmp_path / "small", cache_gb=shard / 2 / 2**30).rows(HOOK, 0, 1)
    assert "\n" not in str(e.value)


def test_a_directory_of_other_files_is_not_taken_as_a_cache(stores, tmp_path):
    _, url = stores
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SaekitError, match="not a saekit shard cache"):
        open_store(url, cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_two_processes_share_one_cache(stores, tmp_path):
    local, url = stores
    cache = tmp_path / "cache"
    code = f"from saekit.store import open_store; assert open_store({url!r}, cache_dir={str(cache)!r}).verify() == []"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert open_store(url, cache_dir=cache).verify() == []


# -- review findings: each failed before its fix ---------------------------------------------------


def test_a_file_another_process_evicted_is_unmapped_so_its_space_is_freed(stores, tmp_path):
    local, url = stores
    st = open_store(url, cache_dir=tmp_path / "cache")
    st.rows(HOOK, 0, 10)  # shard 0 mapped
    (cached,) = (tmp_path / "cache").rglob(f"acts/{HOOK}/c/0/0")
    cached.unlink()  # what another process sharing the cache does when it needs room
    st.rows(HOOK, 64, 74)  # a download: the cache makes room, and drops what others evicted
    assert f"{cached} (deleted)" not in Path("/proc/self/maps").read_text()
    assert torch.equal(st.rows(HOOK, 0, 10), open_store(local).rows(HOOK, 0, 10))  # fetched again


def test_verify_of_a_url_checks_the_bucket_not_the_cache(stores, tmp_path):
    _, url = stores
    st = open_store(url, cache_dir=tmp_path / "cache")
    assert st.verify() == []  # every shard now cached
    r = Remote(url)
    name = shard_files(st.layout, 1)[f"acts/{HOOK}"]
    r.write_bytes(name, flip(r.read_bytes(name)))
    assert any(p.startswith(name) and "corrupt" in p for p in open_store(url, cache_dir=tmp_path / "cache").verify())


def test_info_and_ls_of_a_bucket_need_no_shard_cache(stores, tmp_path, monkeypatch):
    from saekit.store import list_stores

    _, url = stores
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    monkeypatch.setenv("SAEKIT_SHARD_CACHE", str(tmp_path / "mine"))
    assert open_store(url, allow_incomplete=True, check=False).n_rows == 200  # what `info` opens
    assert [s.ok for s in list_stores(url.rsplit("/", 1)[0])] == [True]


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "-1", "lots"])
@pytest.mark.slow
def test_a_bad_shard_cache_gb_in_the_environment_is_one_line(stores, tmp_path, monkeypatch, value):
    _, url = stores
    monkeypatch.setenv("SAEKIT_SHARD_CACHE_GB", value)
    with pytest.raises(SaekitError, match="SAEKIT_SHARD_CACHE_GB") as e:
        open_store(url, cache_dir=tmp_path / "cache").rows(HOOK, 0, 1)
    assert "\n" not in str(e.value)

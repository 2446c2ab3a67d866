"""The activation cache: exact bf16 round trip, resume after SIGKILL, multi-process writers,
shuffled batches (determinism, exactly-once across ranks), corruption detection, and errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.errors import SaekitError
from saekit.store import HookStats, create_store, open_store

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"
META = {"model": "tiny", "dataset": "unit-test", "ctx_len": 8, "bos": "skip"}
SHARD, CHUNK = 64, 16  # tiny layout: several shards, several inner chunks per shard


def rows_with_ids(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    """[n, d] float rows whose first two columns spell the row index exactly in bf16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    idx = torch.arange(n)
    x[:, 0] = (idx % 256).float()  # integers <= 256 are exact in bf16
    x[:, 1] = (idx // 256).float()
    return x


def ids_of(batch: torch.Tensor) -> np.ndarray:
    f = batch.float()
    return (f[:, 0] + 256 * f[:, 1]).long().numpy()


def write_store(path, x: torch.Tensor, *, meta=META, batch: int = 50, n_rows=None, **kw):
    w = create_store(
        path, {HOOK: x.shape[1]}, n_rows=n_rows or x.shape[0], meta=meta, shard_rows=SHARD, chunk_rows=CHUNK, **kw
    )
    n = x.shape[0]
    for s in range(w.resume_row, n, batch):
        e = min(s + batch, n)
        w.append({HOOK: x[s:e]}, torch.arange(s, e) + 1000, torch.arange(s, e) % 8)
    w.finalize()
    return open_store(path)


def shard_file(root: Path, index: int) -> Path:
    return root / "acts" / HOOK / "c" / str(index) / "0"


def run_py(code: str, *args, wait=True, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --- round trip ---------------------------------------------------------------------------------


def test_bf16_round_trip_is_bitwise_for_every_pattern(tmp_path):
    # all 65,536 bf16 bit patterns: inf, -inf, every nan payload, -0, subnormals, extremes.
    bits = np.arange(65536, dtype=np.uint16).reshape(-1, 16)
    x = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    w = create_store(tmp_path / "s", {HOOK: 16}, n_rows=len(x), meta=META, shard_rows=1024, chunk_rows=256)
    w.append({HOOK: x}, torch.zeros(len(x)), torch.zeros(len(x)))
    w.finalize()
    for store in (open_store(tmp_path / "s"), open_store(f"file://{tmp_path / 's'}")):  # memmap and zarr paths
        got = store.rows(HOOK, 0, len(x))
        assert got.dtype == torch.bfloat16
        assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), bits)


def test_float32_input_is_rounded_like_torch_and_keeps_specials(tmp_path):
    tiny = 2.0**-130  # a bf16 subnormal
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), -0.0, tiny, -tiny, 3.0e38, 1.0 + 2**-9]])
    x = torch.cat([special, torch.randn(9, 8)])
    st = write_store(tmp_path / "s", x)
    got = st.rows(HOOK, 0, len(x))
    want = x.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert torch.signbit(got[0, 3]) and got[0, 4] != 0


def test_rows_tokens_positions_stats_and_truncation(tmp_path):
    x = rows_with_ids(300)
    # capacity 100 < 300 rows: the single writer grows the arrays; finalize truncates to 250.
    w = create_store(
        tmp_path / "s",
        {HOOK: 6, "blocks.1.hook_resid_pre": 3},
        n_rows=100,
        meta=META,
        shard_rows=SHARD,
        chunk_rows=CHUNK,
    )
    for s in range(0, 300, 70):
        e = min(s + 70, 300)
        w.append(
            {HOOK: x[s:e], "blocks.1.hook_resid_pre": x[s:e, 3:].double()}, torch.arange(s, e), torch.arange(s, e) % 8
        )
    w.finalize(n_rows=250)
    st = open_store(tmp_path / "s")
    assert st.complete and st.n_rows == 250 and st.hooks == [HOOK, "blocks.1.hook_resid_pre"]
    assert st.d_model(HOOK) == 6 and st.d_model("blocks.1.hook_resid_pre") == 3
    assert torch.equal(st.rows(HOOK, 0, 250), x[:250].bfloat16())
    # rows inside one shard are a view of the memory map: no copy, the same memory every time
    assert st.rows(HOOK, 10, 20).data_ptr() == st.rows(HOOK, 10, 30).data_ptr() == st.rows(HOOK, 0, 64)[10:].data_ptr()
    assert torch.equal(st.rows("blocks.1.hook_resid_pre", 60, 130), x[60:130, 3:].bfloat16())
    assert torch.equal(st.tokens(0, 250), torch.arange(250, dtype=torch.int32))
    assert torch.equal(st.positions(10, 20), torch.arange(10, 20, dtype=torch.int32) % 8)
    assert torch.equal(st.take(HOOK, [249, 0, 64, 0]), x[[249, 0, 64, 0]].bfloat16())
    assert torch.equal(torch.cat(list(st.iter_rows(HOOK, 37, start=5, stop=200))), x[5:200].bfloat16())
    kept = x[:250].bfloat16().double()  # stats come from the stored (bf16) rows, truncated ones excluded
    stats = st.stats(HOOK)
    assert isinstance(stats, HookStats) and stats.mean.dtype == torch.float32
    assert torch.allclose(stats.mean.double(), kept.mean(0), atol=1e-6)
    assert stats.mean_sq_norm == pytest.approx(float((kept**2).sum(1).mean()), rel=1e-6)
    with pytest.raises(SaekitError, match="several hooks"):
        st.resolve_hook(None)
    with pytest.raises(SaekitError, match="no hook"):
        st.rows("blocks.9.hook_resid_pre", 0, 1)


def test_shard_files_are_byte_identical_to_what_zarr_writes(tmp_path):
    import zarr

    x = rows_with_ids(2 * SHARD)
    write_store(tmp_path / "s", x)
    ref = zarr.open_group(str(tmp_path / "z"), mode="w", zarr_format=3)
    arr_meta = json.loads((tmp_path / "s" / "acts" / HOOK / "zarr.json").read_text())
    a = ref.create_array(
        "a",
        shape=(2 * SHARD, 6),
        dtype="uint16",
        shards=(SHARD, 6),
        chunks=(CHUNK, 6),
        compressors=None,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    assert json.loads((tmp_path / "z" / "a" / "zarr.json").read_text())["codecs"] == arr_meta["codecs"]
    a[:] = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    for i in range(2):
        assert shard_file(tmp_path / "s", i).read_bytes() == (tmp_path / "z" / "a" / "c" / str(i) / "0").read_bytes()


def test_content_hash_depends_on_rows_not_on_how_they_were_appended(tmp_path):
    x = rows_with_ids(200)
    a = write_store(tmp_path / "a", x, batch=7)
    b = write_store(tmp_path / "b", x, batch=200)
    y = x.clone()
    y[150, 3] += 1
    c = write_store(tmp_path / "c", y)
    assert a.content_hash == b.content_hash != c.content_hash
    assert (tmp_path / "a" / "zarr.json").read_bytes() == (tmp_path / "b" / "zarr.json").read_bytes()


# --- resume after SIGKILL, multi-process writers -------------------------------------------------

CHILD_WRITER = """
import sys, time, torch
sys.path.insert(0, sys.argv[3])
from test_store import rows_with_ids, HOOK, META, SHARD, CHUNK
import saekit.store.shards as shards
import saekit.store as store

path, progress = sys.argv[1], sys.argv[2]
x = rows_with_ids(300)
real = shards.write_json_atomic
def slow_record(p, obj):
    if obj.get("index") == 2:  # shard 2's data is on disk, its record is not: the worst moment
        open(progress, "w").write("2")
        time.sleep(600)
    real(p, obj)
shards.write_json_atomic = slow_record
w = store.create_store(path, {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
for s in range(0, 300, 50):
    w.append({HOOK: x[s:s+50]}, torch.arange(s, s + 50) + 1000, torch.arange(s, s + 50) % 8)
"""


def wait_for(path: Path, proc, timeout=90.0):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("child made no progress")
        time.sleep(0.05)


def test_sigkill_mid_write_then_resume_gives_the_same_store(tmp_path):
    x = rows_with_ids(300)
    ref = write_store(tmp_path / "ref", x)
    progress = tmp_path / "progress"
    proc = run_py(CHILD_WRITER, tmp_path / "s", progress, REPO / "tests", wait=False)
    wait_for(progress, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    torn = shard_file(tmp_path / "s", 2)  # make shard 2 look torn as well: it must be rewritten, not trusted
    torn.write_bytes(torn.read_bytes()[:1000])
    with pytest.raises(SaekitError, match="incomplete"):
        open_store(tmp_path / "s")
    partial = open_store(tmp_path / "s", allow_incomplete=True)  # shards 0 and 1 are readable
    assert partial.n_rows == 2 * SHARD and torch.equal(partial.rows(HOOK, 0, 128), x[:128].bfloat16())
    with pytest.raises(SaekitError, match="resume"):
        create_store(tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    # finished shards damaged while the writer was down: resume checks them against their records
    raw = bytearray(shard_file(tmp_path / "s", 0).read_bytes())
    raw[7] ^= 0x10
    shard_file(tmp_path / "s", 0).write_bytes(bytes(raw))
    (tmp_path / "s" / "tokens" / "c" / "1").unlink()
    st = write_store(tmp_path / "s", x, resume=True)  # shards 0 and 1 (damaged), 2 (data, no record) are redone
    assert st.content_hash == ref.content_hash
    assert torch.equal(st.rows(HOOK, 0, 300), x.bfloat16()) and st.verify() == []
    assert (tmp_path / "s" / "zarr.json").read_bytes() == (tmp_path / "ref" / "zarr.json").read_bytes()


def test_records_written_before_the_shared_shard_writer_still_count_on_resume(tmp_path):
    x = rows_with_ids(300)
    ref = write_store(tmp_path / "ref", x)
    w = create_store(tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    w.append({HOOK: x[:150]}, torch.arange(150) + 1000, torch.arange(150) % 8)  # shards 0 and 1 written
    for p in (tmp_path / "s" / ".saekit-shards").glob("shard-*.json"):  # the checksums' old key
        doc = json.loads(p.read_text())
        doc["crc"] = doc.pop("crc32c")
        p.write_text(json.dumps(doc))
    w = create_store(tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, resume=True)
    assert w.resume_row == 2 * SHARD and w.damaged == []  # kept, not redone
    st = write_store(tmp_path / "s", x, resume=True)
    assert st.content_hash == ref.content_hash


CHILD_RANK = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_store import rows_with_ids, HOOK, META, SHARD, CHUNK
from saekit.store import create_store

path, rank = sys.argv[1], int(sys.argv[2])
x = rows_with_ids(300)
w = create_store(path, {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, resume=True, rank=rank, world_size=2)
for g in range(rank, 5, 2):  # this rank's stream: shards rank, rank+2, ... (shard 4 is partial)
    s, e = g * SHARD, min((g + 1) * SHARD, 300)
    w.append({HOOK: x[s:e]}, torch.arange(s, e) + 1000, torch.arange(s, e) % 8)
w.close()  # writes this rank's partial shard; finalize is rank 0's job
"""


def test_two_processes_writing_disjoint_shards_match_one_writer(tmp_path):
    x = rows_with_ids(300)
    ref = write_store(tmp_path / "ref", x)
    create_store(tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, world_size=2)
    procs = [run_py(CHILD_RANK, tmp_path / "s", r, REPO / "tests", wait=False) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    w = create_store(
        tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, resume=True, world_size=2
    )
    w.finalize()
    st = open_store(tmp_path / "s")
    assert st.content_hash == ref.content_hash and st.n_rows == 300
    assert torch.equal(st.rows(HOOK, 0, 300), x.bfloat16())
    assert torch.equal(st.stats(HOOK).mean, ref.stats(HOOK).mean)  # exact: same per-shard sums, same order


def test_finalize_refuses_a_gap_left_by_a_missing_rank(tmp_path):
    x = rows_with_ids(3 * SHARD)
    create_store(tmp_path / "s", {HOOK: 6}, n_rows=len(x), meta=META, shard_rows=SHARD, chunk_rows=CHUNK, world_size=2)
    w1 = create_store(
        tmp_path / "s", {HOOK: 6}, n_rows=len(x), meta=META, shard_rows=SHARD, chunk_rows=CHUNK, rank=1, world_size=2
    )
    w1.write_shard(1, {HOOK: x[SHARD : 2 * SHARD]}, torch.zeros(SHARD), torch.zeros(SHARD))
    with pytest.raises(SaekitError, match="rank 0"):
        w1.finalize()
    with pytest.raises(SaekitError, match="belongs to rank 0"):
        w1.write_shard(2, {HOOK: x[:SHARD]}, torch.zeros(SHARD), torch.zeros(SHARD))
    w0 = create_store(
        tmp_path / "s",
        {HOOK: 6},
        n_rows=len(x),
        meta=META,
        shard_rows=SHARD,
        chunk_rows=CHUNK,
        resume=True,
        world_size=2,
    )
    w0.write_shard(2, {HOOK: x[2 * SHARD :]}, torch.zeros(SHARD), torch.zeros(SHARD))
    with pytest.raises(SaekitError, match=r"shards \[0\]"):
        w0.finalize()


# --- shuffled batches --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("ids") / "s", rows_with_ids(1000))  # last block partial


def test_shuffle_is_deterministic_and_seeded(id_store):
    def stream(**kw):
        return np.concatenate([ids_of(b) for b in id_store.shuffled_batches(HOOK, 30, window_blocks=3, **kw)])

    a = stream(seed=1)
    assert np.array_equal(a, stream(seed=1))
    assert np.array_equal(a, stream(seed=1, prefetch=False))
    assert not np.array_equal(a, stream(seed=2))
    assert not np.array_equal(a, stream(seed=1, epoch=1))
    assert not np.array_equal(a, np.arange(1000))  # actually shuffled
    # resume: starting at batch k gives exactly the rest of the stream
    tail = np.concatenate(
        [ids_of(b) for b in id_store.shuffled_batches(HOOK, 30, seed=1, window_blocks=3, start_batch=11)]
    )
    assert np.array_equal(tail, a[11 * 30 :])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_exactly_once_per_epoch_across_ranks(id_store, world_size):
    got = []
    for r in range(world_size):
        batches = list(
            id_store.shuffled_batches(HOOK, 30, seed=7, epoch=2, rank=r, world_size=world_size, window_blocks=3)
        )
        assert all(b.shape == (30, 6) and b.dtype == torch.bfloat16 for b in batches[:-1])
        got += [ids_of(b) for b in batches]
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(1000))


def test_stop_row_holds_out_the_tail_and_drop_last(id_store):
    got = np.concatenate([ids_of(b) for b in id_store.shuffled_batches(HOOK, 32, seed=3, stop_row=900)])
    assert np.array_equal(np.sort(got), np.arange(900))
    sizes = [len(b) for b in id_store.shuffled_batches(HOOK, 32, seed=3, stop_row=900, drop_last=True)]
    assert set(sizes) == {32} and len(sizes) == 900 // 32
    with pytest.raises(SaekitError, match="rank 3 is outside"):
        id_store.shuffled_batches(HOOK, 32, seed=3, rank=3, world_size=3)  # refused at the call, not later


def test_url_stores_read_like_the_local_store(tmp_path, id_store):
    """memory:// is object storage (the shard cache), file:// goes through zarr."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(id_store._root), "/ids-store", recursive=True)
    for url in ("memory://ids-store", f"file://{id_store._root}"):
        st = open_store(url)
        assert st.content_hash == id_store.content_hash
        assert torch.equal(st.rows(HOOK, 40, 140), id_store.rows(HOOK, 40, 140))
        a = [ids_of(b) for b in st.shuffled_batches(HOOK, 50, seed=5)]
        b = [ids_of(b) for b in id_store.shuffled_batches(HOOK, 50, seed=5)]
        assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
        assert st.verify() == []


# --- corruption ---------------------------------------------------------------------------------


def test_corrupt_data_is_named_by_verify_and_refused_by_the_reader(tmp_path):
    write_store(tmp_path / "s", rows_with_ids(300))
    f = shard_file(tmp_path / "s", 2)
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0xFF  # inside the rows, index intact
    f.write_bytes(bytes(raw))
    st = open_store(tmp_path / "s")
    bad = st.verify()
    assert len(bad) == 1 and f"acts/{HOOK}/c/2/0" in bad[0]
    assert torch.equal(st.rows(HOOK, 0, 128), rows_with_ids(300)[:128].bfloat16())  # other shards still read
    with pytest.raises(SaekitError, match="c/2/0 is corrupt") as e:
        st.rows(HOOK, 130, 140)
    assert "\n" not in str(e.value)


def test_corrupt_index_and_missing_shard(tmp_path):
    write_store(tmp_path / "s", rows_with_ids(300))
    f = shard_file(tmp_path / "s", 1)
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # inside the shard index: memmap check fails, zarr's crc32c refuses too
    f.write_bytes(bytes(raw))
    shard_file(tmp_path / "s", 3).unlink()
    with pytest.raises(SaekitError, match=f"acts/{HOOK}/c/3/0 is missing"):
        open_store(tmp_path / "s")  # checked on open: a stage fails before it writes anything
    st = open_store(tmp_path / "s", check=False)  # how verify opens it, to list every bad shard
    bad = st.verify()
    assert [b.split(":")[0] for b in bad] == [f"acts/{HOOK}/c/1/0", f"acts/{HOOK}/c/3/0"]
    with pytest.raises(SaekitError, match="verify"):
        st.rows(HOOK, 64, 70)


# --- errors ------------------------------------------------------------------------------------


def test_opening_what_is_not_a_store(tmp_path):
    with pytest.raises(SaekitError, match="no store"):
        open_store(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(SaekitError, match="not a saekit activation store"):
        open_store(tmp_path / "junk")
    with pytest.raises(SaekitError, match="not a saekit"):
        open_store(tmp_path)


def test_create_refuses_a_non_empty_path_and_keeps_its_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(SaekitError, match="not empty|new path"):
            create_store(tmp_path / "d", {HOOK: 6}, n_rows=10, meta=META, **kw)
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep me"
    st = write_store(tmp_path / "s", rows_with_ids(100))
    with pytest.raises(SaekitError, match=r"resume=True.*overwrite=True"):
        create_store(tmp_path / "s", {HOOK: 6}, n_rows=10, meta=META)
    with pytest.raises(SaekitError, match="already complete"):
        create_store(tmp_path / "s", {HOOK: 6}, n_rows=10, meta=META, resume=True)
    assert open_store(tmp_path / "s").content_hash == st.content_hash  # nothing lost
    st2 = write_store(tmp_path / "s", rows_with_ids(50), overwrite=True)
    assert st2.n_rows == 50


def test_resume_refuses_different_metadata(tmp_path):
    create_store(tmp_path / "s", {HOOK: 6}, n_rows=10, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    with pytest.raises(SaekitError, match="differs in: ctx_len"):
        create_store(
            tmp_path / "s",
            {HOOK: 6},
            n_rows=10,
            meta={**META, "ctx_len": 16},
            shard_rows=SHARD,
            chunk_rows=CHUNK,
            resume=True,
        )
    with pytest.raises(SaekitError, match="layout"):
        create_store(tmp_path / "s", {HOOK: 7}, n_rows=10, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, resume=True)


def test_wrong_row_width_is_refused_without_losing_rows(tmp_path):
    x = rows_with_ids(100)
    w = create_store(tmp_path / "s", {HOOK: 6}, n_rows=100, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    w.append({HOOK: x[:70]}, torch.arange(70) + 1000, torch.arange(70) % 8)
    with pytest.raises(SaekitError, match=r"\[n, 6\]"):
        w.append({HOOK: torch.zeros(5, 7)}, torch.zeros(5), torch.zeros(5))
    with pytest.raises(SaekitError, match="hooks"):
        w.append({"other": x[:5]}, torch.zeros(5), torch.zeros(5))
    with pytest.raises(SaekitError, match="tokens"):
        w.append({HOOK: x[:5]}, torch.zeros(4), torch.zeros(5))
    w.append({HOOK: x[70:]}, torch.arange(70, 100) + 1000, torch.arange(70, 100) % 8)
    w.finalize()
    assert torch.equal(open_store(tmp_path / "s").rows(HOOK, 0, 100), x.bfloat16())


def test_reading_an_incomplete_store_needs_asking(tmp_path):
    x = rows_with_ids(100)
    w = create_store(tmp_path / "s", {HOOK: 6}, n_rows=100, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    w.append({HOOK: x}, torch.zeros(100), torch.zeros(100))  # shard 0 written, 36 rows buffered
    with pytest.raises(SaekitError, match="allow_incomplete=True") as e:
        open_store(tmp_path / "s")
    assert "\n" not in str(e.value)
    st = open_store(tmp_path / "s", allow_incomplete=True)
    assert not st.complete and st.n_rows == SHARD and st.content_hash == ""
    assert torch.equal(st.rows(HOOK, 0, SHARD), x[:SHARD].bfloat16())
    assert json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["complete"] is False


# --- integrity: nothing read silently wrong ---------------------------------------------------


def edit_attrs(root: Path, change) -> None:
    """Hand-edit a store's group attributes in zarr.json (what a user or a bad copy might do)."""
    doc = json.loads((root / "zarr.json").read_text())
    change(doc["attributes"])
    (root / "zarr.json").write_text(json.dumps(doc))


def recompress(root: Path) -> None:
    """Re-encode the hook's array with zstd, as another zarr writer might: not memory-mappable, so
    every read of it goes through zarr."""
    import zarr
    from zarr.codecs import ZstdCodec

    path = str(root / "acts" / HOOK)
    old = zarr.open_array(path, mode="r")
    values, attrs = old[:], old.attrs.asdict()
    new = zarr.create_array(
        path,
        shape=old.shape,
        dtype=old.dtype,
        shards=old.shards,
        chunks=old.chunks,
        compressors=ZstdCodec(),
        fill_value=0,
        overwrite=True,
    )
    new[:] = values
    new.attrs.update(attrs)


def openings(root: Path) -> dict:
    """Every way a reader gets at a store's shards."""
    return {
        "memmap": lambda: open_store(root),
        "memmap, check=False": lambda: open_store(root, check=False),
        "file:// URL (zarr)": lambda: open_store(f"file://{root}"),
        "file:// URL, check=False": lambda: open_store(f"file://{root}", check=False),
    }


READS = {  # read path -> (what it reads, the array it reads)
    "rows": (lambda st: st.rows(HOOK, 100, 200), f"acts/{HOOK}/c/2/0"),
    "take": (lambda st: st.take(HOOK, [5, 150, 299]), f"acts/{HOOK}/c/2/0"),
    "iter_rows": (lambda st: list(st.iter_rows(HOOK, 50)), f"acts/{HOOK}/c/2/0"),
    "shuffled_batches": (lambda st: list(st.shuffled_batches(HOOK, 32, seed=0)), f"acts/{HOOK}/c/2/0"),
    "tokens": (lambda st: st.tokens(0, 300), "tokens/c/2"),
    "positions": (lambda st: st.positions(120, 140), "positions/c/2"),
}


@pytest.mark.parametrize("layout", ["saekit", "zstd (another writer)"])
def test_a_missing_shard_file_is_an_error_on_every_read_path(tmp_path, layout):
    x = rows_with_ids(300)
    write_store(tmp_path / "s", x)
    if layout != "saekit":
        recompress(tmp_path / "s")
    for name in (f"acts/{HOOK}/c/2/0", "tokens/c/2", "positions/c/2"):
        (tmp_path / "s" / name).unlink()
    for how, opener in openings(tmp_path / "s").items():
        if how == "memmap":  # a local store with checks on: refused when opened, before any read
            with pytest.raises(SaekitError, match=f"acts/{HOOK}/c/2/0 is missing"):
                opener()
            continue
        st = opener()
        assert torch.equal(st.rows(HOOK, 0, 128), x[:128].bfloat16()), how  # the other shards still read
        for read, (fn, name) in READS.items():
            with pytest.raises(SaekitError, match=f"{name} is missing") as e:
                fn(st)
            assert "\n" not in str(e.value), (how, read)
        bad = st.verify()
        assert [b.split(":")[0] for b in bad] == [f"acts/{HOOK}/c/2/0", "tokens/c/2", "positions/c/2"], how


def test_an_empty_shard_file_is_an_error_even_unchecked(tmp_path):
    write_store(tmp_path / "s", rows_with_ids(300))
    shard_file(tmp_path / "s", 2).write_bytes(b"")  # e.g. a copy that ran out of space: zarr reads it as zeros
    for opener in openings(tmp_path / "s").values():
        with pytest.raises(SaekitError, match=f"acts/{HOOK}/c/2/0 is empty"):
            opener().rows(HOOK, 130, 140)
    assert [b.split(":")[0] for b in open_store(tmp_path / "s", check=False).verify()] == [f"acts/{HOOK}/c/2/0"]


@pytest.mark.parametrize("layout", ["saekit", "zstd (another writer)"])
def test_reads_through_zarr_check_each_shard_and_keep_few_in_memory(tmp_path, monkeypatch, layout):
    import zarr

    import saekit.store.reader as store_reader

    x = rows_with_ids(300)
    write_store(tmp_path / "s", x)
    if layout == "saekit":  # rows changed in place, shard index intact: zarr reads them without complaint
        f = shard_file(tmp_path / "s", 1)
        raw = bytearray(f.read_bytes())
        raw[100] ^= 0xFF
        f.write_bytes(bytes(raw))
    else:  # another writer rewrote some rows: the file is valid zarr, the rows are not the recorded ones
        recompress(tmp_path / "s")
        zarr.open_array(str(tmp_path / "s" / "acts" / HOOK), mode="r+")[70:72] = 7
    url = f"file://{tmp_path / 's'}"
    for st in (open_store(url), open_store(tmp_path / "s")):
        with pytest.raises(SaekitError, match=f"acts/{HOOK}/c/1/0 is corrupt"):
            st.rows(HOOK, 64, 70)
        with pytest.raises(SaekitError, match="c/1/0 is corrupt"):
            list(st.shuffled_batches(HOOK, 50, seed=1))
    assert open_store(url, check=False).rows(HOOK, 64, 70).shape == (6, 6)  # check=False skips the crc
    # whole shards read through zarr are kept in a small cache, not all of them
    monkeypatch.setattr(store_reader, "FALLBACK_CACHE_BYTES", 1)
    st = open_store(url, check=False)
    got = torch.cat(list(st.iter_rows(HOOK, 30)))
    assert torch.equal(got[:64], x[:64].bfloat16()) and torch.equal(got[128:], x[128:].bfloat16())
    assert len(st._fallback) <= 2


def format1(root: Path) -> None:
    """Turn a store into what saekit wrote before format 2: the same attributes, hashed without
    the statistics (sha256 of the canonical JSON of identity, n_rows and shard checksums)."""
    import hashlib

    def downgrade(a):
        a["format_version"] = 1
        keys = ("format", "format_version", "meta", "hooks", "shard_rows", "chunk_rows", "n_rows", "shards")
        doc = json.dumps({k: a[k] for k in keys}, sort_keys=True, separators=(",", ":"), allow_nan=False)
        a["content_hash"] = "sha256:" + hashlib.sha256(doc.encode()).hexdigest()

    edit_attrs(root, downgrade)


def scale_msn(a, by=1000.0):
    a["stats"][HOOK]["mean_sq_norm"] *= by


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: a["meta"].update(ctx_len=16),
        scale_msn,
        lambda a: a["stats"][HOOK]["mean"].__setitem__(2, 0.5),
        lambda a: a["shards"][1]["crc32c"].update(tokens=1),
    ],
    ids=["meta.ctx_len", "mean_sq_norm x1000", "mean[2]", "a shard checksum"],
)
def test_edited_metadata_or_statistics_are_refused_on_open(tmp_path, tamper):
    write_store(tmp_path / "s", rows_with_ids(300))
    edit_attrs(tmp_path / "s", tamper)
    for where in (tmp_path / "s", f"file://{tmp_path / 's'}"):
        with pytest.raises(SaekitError, match="content hash") as e:
            open_store(where)
        assert "\n" not in str(e.value) and "zarr.json" in str(e.value)


def test_verify_recomputes_the_statistics_from_the_rows(tmp_path):
    from saekit.store import content_hash

    ref = write_store(tmp_path / "s", rows_with_ids(300))
    assert open_store(tmp_path / "s").verify() == []

    def forge(a):  # statistics changed and the hash recomputed to match: only the rows can tell
        scale_msn(a, 1.001)
        a["content_hash"] = content_hash(a)

    edit_attrs(tmp_path / "s", forge)
    st = open_store(tmp_path / "s")
    assert st.stats(HOOK).mean_sq_norm != ref.stats(HOOK).mean_sq_norm
    bad = st.verify()
    assert len(bad) == 1 and f"stats.{HOOK}" in bad[0] and "do not match" in bad[0]


def test_format_1_stores_still_read_and_verify(tmp_path):
    ref = write_store(tmp_path / "s", rows_with_ids(300))
    format1(tmp_path / "s")
    st = open_store(tmp_path / "s")
    assert st.format_version == 1 and st.content_hash != ref.content_hash  # hashed the old way
    assert torch.equal(st.rows(HOOK, 0, 300), ref.rows(HOOK, 0, 300)) and st.verify() == []
    # format 1's hash does not cover the statistics: open cannot tell, verify can
    edit_attrs(tmp_path / "s", scale_msn)
    st = open_store(tmp_path / "s")
    assert [b.split(":")[0] for b in st.verify()] == [f"stats.{HOOK}"]
    edit_attrs(tmp_path / "s", lambda a: a["meta"].update(ctx_len=16))
    with pytest.raises(SaekitError, match="content hash"):
        open_store(tmp_path / "s")


DAMAGE = {
    "hook ../../x": lambda a: a.update(hooks={"../../x": 6}),
    "n_rows 'lots'": lambda a: a.update(n_rows="lots"),
    "hooks [1, 2]": lambda a: a.update(hooks=[1, 2]),
    "shards 5": lambda a: a.update(shards=5),
    "stats missing": lambda a: a.pop("stats"),
    "stats malformed": lambda a: a.update(stats={HOOK: {"mean": "zero", "mean_sq_norm": 1.0}}),
    "a shard record": lambda a: a["shards"][2].update(start="x"),
    "d_model '6'": lambda a: a.update(hooks={HOOK: "6"}),
    "meta a list": lambda a: a.update(meta=[]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_attributes_are_one_line(tmp_path, damage):
    write_store(tmp_path / "s", rows_with_ids(300))
    (tmp_path / "x").mkdir()  # where a hook named ../../x would point
    edit_attrs(tmp_path / "s", DAMAGE[damage])
    with pytest.raises(SaekitError, match=r"damaged attributes: .*; restore zarr.json or re-harvest") as e:
        open_store(tmp_path / "s", allow_incomplete=True)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "x").iterdir()) == []


def test_damaged_attributes_of_an_unfinished_store_are_one_line_on_resume(tmp_path):
    w = create_store(tmp_path / "s", {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
    w.append({HOOK: rows_with_ids(100)}, torch.zeros(100), torch.zeros(100))
    for damage in ("hooks [1, 2]", "hook ../../x", "d_model '6'"):
        shutil.copytree(tmp_path / "s", tmp_path / damage)
        edit_attrs(tmp_path / damage, DAMAGE[damage])
        with pytest.raises(SaekitError, match="damaged attributes") as e:
            open_store(tmp_path / damage, allow_incomplete=True)
        assert "\n" not in str(e.value)
        with pytest.raises(SaekitError, match="damaged attributes") as e:
            create_store(
                tmp_path / damage, {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK, resume=True
            )
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", ['{"zarr_format": 3, "node_type": "gr', "", "[1, 2]"])
def test_a_damaged_zarr_json_says_so(tmp_path, content):
    write_store(tmp_path / "s", rows_with_ids(100))
    (tmp_path / "s" / "zarr.json").write_text(content)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*"))
    for fn in (
        lambda: open_store(tmp_path / "s"),
        lambda: create_store(tmp_path / "s", {HOOK: 6}, n_rows=10, meta=META, resume=True),
        lambda: create_store(tmp_path / "s", {HOOK: 6}, n_rows=10, meta=META, overwrite=True),
    ):
        with pytest.raises(SaekitError, match=r"zarr.json is damaged.*restore") as e:
            fn()
        assert "not a saekit" not in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*")) == before  # nothing deleted


def test_a_file_is_not_a_store_directory(tmp_path):
    (tmp_path / "f").write_text("keep me")
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(SaekitError, match="is a file, not a directory; choose a directory path"):
            create_store(tmp_path / "f", {HOOK: 6}, n_rows=10, meta=META, **kw)
    assert (tmp_path / "f").read_text() == "keep me"


CHILD_CREATE = """
import sys, time
sys.path.insert(0, sys.argv[3])
from test_store import HOOK, META, SHARD, CHUNK
import saekit.store.shards as shards
import saekit.store as store

path, progress = sys.argv[1], sys.argv[2]
def stuck(*a, **k):  # arrays created, attributes not yet written: SIGKILL lands here
    open(progress, "w").write("1")
    time.sleep(600)
shards.write_group_attrs = stuck
store.create_store(path, {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
"""


@pytest.mark.slow
def test_sigkill_during_creation_then_resume_or_overwrite(tmp_path):
    x = rows_with_ids(300)
    ref = write_store(tmp_path / "ref", x)
    for mode in ("resume", "overwrite", None):
        out = tmp_path / f"s-{mode}"
        out.mkdir()  # an existing empty directory is a fine place for a store
        proc = run_py(CHILD_CREATE, out, tmp_path / f"progress-{mode}", REPO / "tests", wait=False)
        wait_for(tmp_path / f"progress-{mode}", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert (out / "acts").is_dir()  # the killed creation left arrays behind
        with pytest.raises(SaekitError, match="interrupted"):
            open_store(out)
        st = write_store(out, x, **({mode: True} if mode else {}))
        assert st.content_hash == ref.content_hash and st.verify() == []


CHILD_PARTIAL = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[3])
from test_store import rows_with_ids, HOOK, META, SHARD, CHUNK
import saekit.store as store

path, progress = sys.argv[1], sys.argv[2]
x = rows_with_ids(300)
real = os.replace
def slow_rename(src, dst):
    if str(src).endswith(".partial") and "/c/2" in str(dst):  # shard 2's temp file written, not renamed
        open(progress, "w").write("2")
        time.sleep(600)
    real(src, dst)
os.replace = slow_rename
w = store.create_store(path, {HOOK: 6}, n_rows=300, meta=META, shard_rows=SHARD, chunk_rows=CHUNK)
for s in range(0, 300, 50):
    w.append({HOOK: x[s:s+50]}, torch.arange(s, s + 50) + 1000, torch.arange(s, s + 50) % 8)
"""


def test_temp_files_of_a_failed_shard_write_are_removed_on_resume(tmp_path):
    x = rows_with_ids(300)
    ref = write_store(tmp_path / "ref", x)
    proc = run_py(CHILD_PARTIAL, tmp_path / "s", tmp_path / "progress", REPO / "tests", wait=False)
    wait_for(tmp_path / "progress", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "s").rglob("*.partial"))
    st = write_store(tmp_path / "s", x, resume=True)
    assert list((tmp_path / "s").rglob("*.partial")) == []
    assert st.content_hash == ref.content_hash


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda d: d.update(shape=[d["shape"][0] - 1, *d["shape"][1:]]), "shape"),
        (lambda d: d.update(data_type="int16"), "data type"),
        (lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[7, 6]), "shard shape"),
        (lambda d: d.update(node_type="group"), "not an array"),
    ],
    ids=["shape", "dtype", "shard shape", "node type"],
)
def test_verify_checks_each_arrays_zarr_json(tmp_path, edit, says):
    """The arrays' metadata (shape, data type, shards) is what zarr and every other reader trusts;
    verify checks it against the store's own attributes."""
    st = write_store(tmp_path / "s", rows_with_ids(300))
    assert st.verify() == []
    meta = tmp_path / "s" / "acts" / HOOK / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc)
    meta.write_text(json.dumps(doc))
    bad = open_store(tmp_path / "s").verify()
    assert len(bad) == 1 and bad[0].startswith(f"acts/{HOOK}/zarr.json") and says in bad[0], bad

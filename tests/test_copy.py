"""`saekit copy SRC DST` against a real S3 endpoint on localhost (moto's server) and local disk:
whole checked shard files, the group zarr.json last, resumable, refusing what it must not touch."""

import pytest
from cli_checks import digest, in_process, one_error
from test_cli_store import make_store

from saekit.errors import SaekitError
from saekit.store import open_store
from saekit.store.copy import MARKER, CopyConfig, copy_store
from saekit.store.remote import Remote

TOKENS_2 = "tokens/c/2"  # a shard file of make_store's stores (4 shards of 64 rows, 3 arrays: 12 files)
HOOK_0 = "acts/blocks.3.hook_resid_post/c/0/0"


def copy(src, dst, **kw):
    return copy_store(CopyConfig(src=str(src), dst=str(dst), threads=3, progress=False, **kw))


def flip(path, at=8) -> bytes:
    """Flip one bit inside the valid rows of a file; returns its bytes before."""
    before = path.read_bytes()
    data = bytearray(before)
    data[at] ^= 1
    path.write_bytes(bytes(data))
    return before


def test_round_trip_through_s3_gives_the_same_store(s3_bucket, tmp_path):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/cache/store"
    up = copy(src, url)
    assert (up.copied, up.kept, up.already) == (12, 0, False) and up.bytes > 0
    objects = Remote(url).list()
    assert "zarr.json" in objects and MARKER not in objects
    assert copy(url, f"{s3_bucket}/mirror").copied == 12  # bucket to bucket, through a local staging file
    down = copy(f"{s3_bucket}/mirror", tmp_path / "back")
    assert (down.copied, down.kept, down.content_hash) == (12, 0, up.content_hash)
    assert digest(tmp_path / "back") == digest(src)  # every file, byte for byte
    back = open_store(tmp_path / "back")
    assert back.content_hash == open_store(src).content_hash and back.verify() == []
    again = copy(src, url)
    assert again.already and again.copied == 0


def test_a_corrupt_source_is_never_published_and_a_rerun_copies_only_what_is_missing(s3_bucket, tmp_path):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/store"
    good = flip(src / TOKENS_2)
    with pytest.raises(SaekitError, match=f"{TOKENS_2} is corrupt .*never published.*saekit verify") as e:
        copy(src, url)
    assert "\n" not in str(e.value)
    objects = Remote(url).list()
    assert TOKENS_2 not in objects and MARKER in objects
    assert "zarr.json" not in objects  # so nothing takes the bucket for a store
    with pytest.raises(SaekitError, match="not a saekit activation store"):
        copy(url, tmp_path / "back")

    (src / TOKENS_2).write_bytes(good)
    gone = [n for n in objects if n.startswith("acts/")][:2]  # (files after the bad one may not have started)
    Remote(url).remove(gone)
    left = len(Remote(url).list()) - 1  # but the marker
    r = copy(src, url)
    assert (r.copied, r.kept) == (12 - left, left) and left <= 9
    objects = Remote(url).list()
    assert "zarr.json" in objects and MARKER not in objects


def test_a_corrupt_object_is_caught_on_download_and_a_rerun_repairs_the_copy(s3_bucket, tmp_path):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/store"
    copy(src, url)
    bucket, back = Remote(url), tmp_path / "back"
    data = bytearray(bucket.read_bytes(TOKENS_2))
    data[8] ^= 1
    bucket.write_bytes(TOKENS_2, bytes(data))
    with pytest.raises(SaekitError, match=f"{url}/{TOKENS_2} is corrupt .* in 3 downloads.*saekit verify") as e:
        copy(url, back)
    assert "\n" not in str(e.value)
    assert not (back / TOKENS_2).exists()  # never kept as good
    assert not (back / "zarr.json").exists() and not list(back.rglob("*.partial"))

    bucket.write_bytes(TOKENS_2, (src / TOKENS_2).read_bytes())  # the object restored
    (back / HOOK_0).unlink()
    flip(back / "positions/c/0", at=20)
    good = sum(1 for n in digest(back) if "/c/" in n) - 1  # shard files there and good
    r = copy(url, back)
    assert (r.copied, r.kept) == (12 - good, good)
    assert digest(back) == digest(src) and open_store(back).verify() == []


def test_an_incomplete_or_missing_source_is_refused(s3_bucket, tmp_path):
    make_store(tmp_path / "half", finalize=False)
    with pytest.raises(SaekitError, match="incomplete store.*finish the harvest first"):
        copy(tmp_path / "half", f"{s3_bucket}/x")
    assert Remote(f"{s3_bucket}/x").list() == {}
    with pytest.raises(SaekitError, match="gone does not exist"):
        copy(tmp_path / "gone", tmp_path / "out")
    with pytest.raises(SaekitError, match="does not exist.*check the URL and the bucket"):
        copy("s3://no-such-bucket/store", tmp_path / "out")
    with pytest.raises(SaekitError, match="not found.*check the URL and the bucket"):
        copy(make_store(tmp_path / "s"), "s3://no-such-bucket/store")
    assert not (tmp_path / "out").exists()


def test_another_store_at_dst_is_replaced_only_with_overwrite(s3_bucket, tmp_path):
    a, b = make_store(tmp_path / "a", n=200), make_store(tmp_path / "b", n=100)
    url = f"{s3_bucket}/store"
    copy(a, url)
    before = Remote(url).list()
    with pytest.raises(SaekitError, match="holds another saekit store .*pass --overwrite"):
        copy(b, url)
    assert Remote(url).list() == before
    r = copy(b, url, overwrite=True)
    assert r.content_hash == open_store(b).content_hash
    assert Remote(url).read_bytes("zarr.json") == (b / "zarr.json").read_bytes()
    assert "tokens/c/3" not in Remote(url).list()  # a's shards beyond b's are gone

    flip(a / TOKENS_2)  # a's copy stops partway: an unfinished copy of another store than b
    with pytest.raises(SaekitError, match="corrupt"):
        copy(a, f"{s3_bucket}/half")
    with pytest.raises(SaekitError, match="holds an unfinished copy of another store; pass --overwrite"):
        copy(b, f"{s3_bucket}/half")
    assert copy(b, f"{s3_bucket}/half", overwrite=True).kept == 0
    assert set(Remote(f"{s3_bucket}/half").list()) == set(Remote(url).list())  # b's files only

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # not a store: never written into, never deleted
        with pytest.raises(SaekitError, match="holds no saekit store; refusing"):
            copy(a, mine, overwrite=overwrite)
    assert digest(mine) == {"notes.txt": digest(mine / "notes.txt")["notes.txt"]}


def test_cli_copy_prints_what_it_did(s3_bucket, tmp_path, capsys, monkeypatch):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/store"
    h = open_store(src).content_hash
    code, out, err = in_process(capsys, monkeypatch, "copy", src, url, "--threads", 2)
    assert code == 0, err
    assert out.startswith(f"copied {src} -> {url}: 12 shard file(s), ") and "MB/s" in out and h in out
    code, out, _ = in_process(capsys, monkeypatch, "copy", url, tmp_path / "local")
    assert code == 0 and f"-> {tmp_path / 'local'}: 12 shard file(s)" in out
    code, out, _ = in_process(capsys, monkeypatch, "copy", tmp_path / "local", tmp_path / "local2")  # local to local
    assert code == 0 and digest(tmp_path / "local2") == digest(src)
    code, out, _ = in_process(capsys, monkeypatch, "copy", src, url)
    assert code == 0 and out.strip() == f"{url} already holds this store ({h}); nothing to copy"
    code, _, err = in_process(capsys, monkeypatch, "copy", src, tmp_path / "src" / "inner")
    one_error(code, err, "one is inside the other")


def test_a_full_disk_is_one_line_and_a_rerun_finishes_the_copy(s3_bucket, tmp_path, tmpfs):
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/store"
    copy(src, url)
    disk = tmpfs(16 << 10)  # room for a few of the 12 shard files
    with pytest.raises(SaekitError, match="disk full while writing .*rerun the same `saekit copy`") as e:
        copy(url, disk / "store")
    assert "\n" not in str(e.value) and not (disk / "store" / "zarr.json").exists()
    tmpfs.remount(disk, 1 << 20)
    r = copy(url, disk / "store")
    assert r.kept > 0 and r.copied + r.kept == 12
    assert digest(disk / "store") == digest(src)


def test_a_killed_copy_is_no_store_and_a_rerun_finishes_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import torch

    from saekit.store import create_store

    src, dst = tmp_path / "src", tmp_path / "dst"
    w = create_store(src, {"h": 256}, n_rows=96 * 512, meta={}, shard_rows=512, chunk_rows=128)
    w.append({"h": torch.randn(96 * 512, 256)}, torch.zeros(96 * 512, dtype=torch.int32), torch.zeros(96 * 512))
    w.finalize()
    cmd = [sys.executable, "-m", "saekit.cli.main", "copy", str(src), str(dst), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (dst / "acts/h/c/2/0").exists() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the copy finished before it could be killed"
    assert (dst / MARKER).exists() and not (dst / "zarr.json").exists()
    with pytest.raises(SaekitError, match="not a saekit activation store"):
        open_store(dst)
    r = copy(src, dst)
    assert r.kept >= 6 and r.copied + r.kept == 96 * 3
    assert digest(dst) == digest(src)


# -- review findings: each failed before its fix ---------------------------------------------------


def test_a_store_whose_shard_files_went_missing_is_not_already_there(s3_bucket, tmp_path):
    """An --overwrite cut short (or lost objects) can leave this store's zarr.json over missing
    shard files: a copy repairs it rather than answering "already"."""
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/store"
    copy(src, url)
    Remote(url).remove([HOOK_0, TOKENS_2])
    again = copy(src, url)
    assert not again.already and again.copied == 2
    assert open_store(url, cache_dir=tmp_path / "cache").verify() == []


def test_a_stray_write_probe_at_dst_is_no_obstacle_and_ls_of_a_missing_bucket_is_one_line(s3_bucket, tmp_path):
    from saekit.store import list_stores

    src = make_store(tmp_path / "src")
    Remote(f"{s3_bucket}/probe").write_bytes(".saekit-write-test-999", b"")  # left by a killed process
    assert copy(src, f"{s3_bucket}/probe").copied == 12
    with pytest.raises(SaekitError, match="is not there"):
        list_stores("s3://no-such-bucket-here/cache")


@pytest.mark.parametrize("alias", ["s3a", "S3"])
def test_a_copy_into_itself_under_another_spelling_of_the_url_is_refused(s3_bucket, tmp_path, alias):
    """s3:// and s3a:// (or S3://) name the same bucket: compared as places, not as strings."""
    src = make_store(tmp_path / "src")
    url = f"{s3_bucket}/st"
    copy(src, url)
    before = Remote(url).list()
    other = url.replace("s3://", f"{alias}://", 1)
    for a, b in ((url, f"{other}/sub"), (other, url), (f"{url}/", other)):
        with pytest.raises(SaekitError, match="same place or one is inside the other") as e:
            copy(a, b)
        assert "\n" not in str(e.value)
    assert Remote(url).list() == before

"""Object storage (saekit.store.remote) against a real S3 endpoint on localhost (moto's server)."""

import pytest

from saekit.errors import SaekitError
from saekit.store.remote import Remote


def test_remote_round_trip(s3_bucket, tmp_path):
    r = Remote(f"{s3_bucket}/prefix")
    r.write_bytes("a/b.json", b"{}")
    assert r.read_bytes("a/b.json") == b"{}"
    assert r.read_bytes("nothing") is None
    f = tmp_path / "x.bin"
    f.write_bytes(b"x" * 1000)
    r.put_file(f, "c/x.bin")
    assert r.list() == {"a/b.json": 2, "c/x.bin": 1000}
    r.get_file("c/x.bin", tmp_path / "y" / "x.bin")
    assert (tmp_path / "y" / "x.bin").read_bytes() == b"x" * 1000
    r.remove(["a/b.json"])
    assert r.size("a/b.json") is None and r.size("c/x.bin") == 1000


def test_remote_errors_are_one_line(s3_server):
    with pytest.raises(SaekitError, match="not found") as e:
        Remote("s3://no-such-bucket/x").check_writable()
    assert "\n" not in str(e.value)
    with pytest.raises(SaekitError, match="fsspec knows"):
        Remote("nosuchscheme://x/y")


def test_an_error_raised_from_none_is_not_a_full_disk():
    """`raise SaekitError(...) from None` inside `except OSError(ENOSPC)` says the full disk is
    not the story (the shard cache names its own disk): a stage must not relabel it as its own
    output's full disk."""
    import errno

    from saekit.errors import is_disk_full

    def raised(suppress: bool) -> BaseException:
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                if suppress:
                    raise SaekitError("the shard cache's disk is full: ...") from None
                raise SaekitError("wrapped") from e
        except SaekitError as e:
            return e

    assert is_disk_full(raised(False))
    assert not is_disk_full(raised(True))


@pytest.mark.parametrize("kind", ["directory", "bucket", "file:// URL"])
def test_a_directory_and_a_bucket_answer_the_same_questions(kind, tmp_path, request):
    """`saekit.store.location`: copy, the reader and harvest hold a Location and never ask which kind."""
    from saekit.store.location import location

    where = {
        "directory": lambda: str(tmp_path / "place"),
        "bucket": lambda: request.getfixturevalue("s3_bucket") + "/place",
        "file:// URL": lambda: f"file://{tmp_path / 'place'}",
    }[kind]()
    loc = location(where)
    assert loc.read_bytes("zarr.json") is None and loc.size("zarr.json") is None and loc.list() == {}
    assert not loc.is_non_empty()
    with loc.writing("--out", kept="nothing yet", rerun="rerun"):
        loc.write_bytes("zarr.json", b"{}")
        loc.write_bytes("acts/h/c/0", b"12345")
    assert loc.list() == {"zarr.json": 2, "acts/h/c/0": 5} and loc.list("acts") == {"acts/h/c/0": 5}
    assert loc.read_bytes("acts/h/c/0") == b"12345" and loc.size("acts/h/c/0") == 5 and loc.is_non_empty()
    loc.get_file("acts/h/c/0", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"12345"
    loc.put_file(tmp_path / "got", "copy")
    assert loc.read_bytes("copy") == b"12345"
    assert loc.contains(location(where + "/acts")) and not location(where + "/acts").contains(loc)
    if kind != "bucket":  # a name from outside never lands a write outside the directory
        with pytest.raises(SaekitError, match="lead outside"):
            loc.write_bytes("../escape", b"x")
        assert not (tmp_path / "escape").exists()
    loc.remove(["copy"])
    assert "copy" not in loc.list()
    loc.clear()
    assert loc.list() == {} and not loc.is_non_empty()

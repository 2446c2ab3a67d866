"""Object storage (saekit.remote) against a real S3 endpoint on localhost (moto's server)."""

import pytest

from saekit.errors import SaekitError
from saekit.remote import Remote


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

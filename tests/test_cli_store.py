"""`saekit info` / `saekit verify` through cli.main:main, the wrapper that turns SaekitError into
one `error:` line and a non-zero exit."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.main import main
from saekit.store import create_store

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.3.hook_resid_post"
META = {"model": "tiny-gpt2", "dataset": "embedded", "ctx_len": 16, "bos": "skip first token"}


def make_store(path, n=200, finalize=True):
    w = create_store(path, {HOOK: 8}, n_rows=n, meta=META, shard_rows=64, chunk_rows=16)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    w.append({HOOK: x}, torch.arange(n), torch.arange(n) % 16)
    if finalize:
        w.finalize()
    return path


def cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run `saekit ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["saekit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)  # main() returns normally on success
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_help_exits_zero(capsys, monkeypatch):
    for args in (["--help"], ["info", "--help"], ["verify", "--help"]):
        code, out, _ = cli(capsys, monkeypatch, *args)
        assert code == 0 and "Usage" in out


def test_info_shows_what_a_user_needs(tmp_path, capsys, monkeypatch):
    make_store(tmp_path / "s")
    code, out, _ = cli(capsys, monkeypatch, "info", tmp_path / "s")
    assert code == 0
    for want in (HOOK, "d_model 8", "200", "bfloat16", "sha256:", "tiny-gpt2", "skip first token", "KiB"):
        assert want in out, want
    assert re.search(r"^complete\s+yes$", out, re.M)


def test_info_says_when_a_store_is_incomplete(tmp_path, capsys, monkeypatch):
    make_store(tmp_path / "s", finalize=False)
    code, out, _ = cli(capsys, monkeypatch, "info", tmp_path / "s")
    assert code == 0 and "incomplete" in out and "--resume" in out


def test_verify_clean_then_corrupt(tmp_path, capsys, monkeypatch):
    make_store(tmp_path / "s")
    code, out, _ = cli(capsys, monkeypatch, "verify", tmp_path / "s")
    assert code == 0 and out.startswith("ok")
    f = tmp_path / "s" / "acts" / HOOK / "c" / "1" / "0"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 1
    f.write_bytes(bytes(raw))
    (tmp_path / "s" / "tokens" / "c" / "3").unlink()
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "s")
    assert code != 0
    assert f"acts/{HOOK}/c/1/0" in out and "tokens/c/3" in out and f"acts/{HOOK}/c/0/0" not in out
    assert err.startswith("error:") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["not-a-store", "missing", "truncated-shard"])
def test_errors_are_one_line_without_traceback(tmp_path, case):
    # a real process: what a user sees on the terminal, exit status included
    if case == "not-a-store":
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "data.txt").write_text("hi")
        args = ["info", tmp_path / "x"]
    elif case == "missing":
        args = ["verify", tmp_path / "nothing-here"]
    else:
        # a shard file cut short (e.g. a copy that ran out of disk)
        make_store(tmp_path / "s")
        f = tmp_path / "s" / "acts" / HOOK / "c" / "2" / "0"
        f.write_bytes(f.read_bytes()[:100])
        args = ["verify", tmp_path / "s"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr

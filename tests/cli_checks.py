"""Helpers for tests of what a user sees when a command fails: the real CLI in a subprocess (or
in-process through saekit.cli.main:main), one `error:` line, no traceback, and files left unchanged."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def saekit(*args, prefix: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m saekit.cli.main ARGS` in a subprocess (under `prefix`, e.g. NO_DAC), one torch thread."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [*(prefix or []), sys.executable, "-m", "saekit.cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """`saekit ARGS` through saekit.cli.main:main in this process: (exit code, stdout, stderr)."""
    from saekit.cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)  # main() returns normally on success
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def one_error(code: int, stderr: str, *needles: str) -> str:
    """Assert a failed command ended with exactly one `error: ...` line (after any progress bars),
    holding every needle, and no traceback; return that line."""
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), by relative path."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


PAGE = 4096


def tmpfs_bytes(path: Path) -> int:
    """Bytes a tmpfs needs for the files under `path` (each file takes whole pages)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)

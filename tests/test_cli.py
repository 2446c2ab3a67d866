"""Every `saekit` command answers --help, and bad input is one line with a non-zero exit."""

import subprocess
import sys

import pytest

from cli.main import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def _saekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=120)


def test_every_stage_is_registered():
    assert {"harvest", "train", "pursue", "info", "verify", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    r = _saekit(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "--help" in r.stdout


def test_library_never_imports_the_cli():
    code = "import sys, saekit.store, saekit.harvest, saekit.sae, saekit.pursuit, saekit.train, saekit.pursue, saekit.demo; print(any(m == 'cli' or m.startswith('cli.') for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_store_that_is_not_there_is_one_line(tmp_path):
    r = _saekit("info", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr

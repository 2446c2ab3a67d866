"""Every `saekit` command answers --help, and bad input is one line with a non-zero exit: the same
line for a bad --device in every command, one line for an --out that cannot be written, one line
on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_checks import NO_DAC, REPO, digest, in_process, one_error, saekit
from test_cli_store import make_store

from saekit.cli.main import app
from saekit.sae import SparseAutoencoder
from saekit.store import RECORDS_DIR, open_store
from saekit.train.checkpoint import checkpoint_dir

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def _saekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saekit.cli.main", *args], capture_output=True, text=True, timeout=120)


def test_every_stage_is_registered():
    assert {"harvest", "train", "pursue", "eval", "info", "verify", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.slow
def test_help(command):
    r = _saekit(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "--help" in r.stdout


def test_library_never_imports_the_cli():
    code = (
        "import sys, saekit.config, saekit.store, saekit.harvest, saekit.sae, saekit.pursuit, saekit.train, saekit.pursue, "
        "saekit.eval, saekit.demo; print(any(m in ('cli', 'saekit.cli') or m.startswith(('cli.', 'saekit.cli.')) for m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_store_that_is_not_there_is_one_line(tmp_path):
    r = _saekit("info", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


# --- the same one line for a bad --device, and for an --out that cannot be written -----------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny store (d 8) and an SAE for it, for commands that need them."""
    root = tmp_path_factory.mktemp("inputs")
    SparseAutoencoder(d_in=8, n_features=16, k=2).save(root / "sae")
    return make_store(root / "store"), root / "sae"


def _args(command: str, out, inputs, device: str = "cpu") -> list:
    store, sae = inputs
    return {
        "harvest": ["harvest", "--tokens", 256, "--device", device, "--out", out],
        "train": [
            "train",
            "--store",
            store,
            "--n-features",
            16,
            "--k",
            2,
            "--batch-size",
            64,
            "--tokens",
            64,
            "--device",
            device,
            "--no-progress",
            "--out",
            out,
        ],
        "pursue": ["pursue", "--store", store, "--sae", sae, "--k", 2, "--device", device, "--out", out],
        "eval": ["eval", "--store", store, "--sae", sae, "--device", device, "--out", out],
        "demo": ["demo", "--tokens", 4096, "--steps", 10, "--rows", 256, "--device", device, "--out", out],
    }[command]


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "banana"])
@pytest.mark.parametrize("command", ["harvest", "train", "pursue", "eval", "demo"])
def test_a_bad_device_is_the_same_line_in_every_command(tmp_path, inputs, capsys, monkeypatch, command, device):
    code, _, err = in_process(capsys, monkeypatch, *_args(command, tmp_path / "out", inputs, device))
    line = one_error(code, err)
    assert line == f"error: unknown --device {device!r}: use auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "out").exists()


OUT_CASES = {
    "read-only": "read-only",
    "no permission": "permission",
    "name too long": "too long",
    "a file": "is a file",
}


# (harvest's own check of an --out that is a file belongs to harvest's tests)
@pytest.mark.parametrize(
    "command, case",
    [
        (c, k)
        for c in ("harvest", "train", "pursue", "eval", "demo")
        for k in OUT_CASES
        if (c, k) != ("harvest", "a file")
    ],
)
@pytest.mark.slow
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, inputs, tmpfs, capsys, monkeypatch, command, case):
    if case == "read-only":
        out = tmpfs(1 << 20, ro=True) / "out"
    elif case == "no permission":
        (tmp_path / "locked").mkdir(mode=0o555)
        out = tmp_path / "locked" / "out"
    elif case == "name too long":
        out = tmp_path / ("x" * 300) / "out"
    else:
        out = tmp_path / "out"
        out.write_text("a file the user keeps")
    before = digest(tmp_path)
    if case == "no permission":  # a real user without root's override of file permissions
        r = saekit(*_args(command, out, inputs), prefix=NO_DAC)
        code, err = r.returncode, r.stderr
    else:
        code, _, err = in_process(capsys, monkeypatch, *_args(command, out, inputs))
    line = one_error(code, err, str(out)[:60])
    assert OUT_CASES[case] in line.lower(), line
    assert digest(tmp_path) == before  # nothing written, nothing changed


# --- Ctrl-C ---------------------------------------------------------------------------------


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> tuple[int, str]:
    """Send SIGINT once ready() holds; (exit status, stderr)."""
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, "never got ready"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _popen(*args) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "saekit.cli.main", *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C in a terminal reaches a process whose SIGINT is the default; a test suite started
        # in the background (`cmd &` in a script, nohup) runs with SIGINT ignored, which a child
        # would inherit, and the command would never see the Ctrl-C this test sends
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _said_interrupted(code: int, err: str, what: str) -> None:
    assert code == 130, err
    assert "Traceback" not in err and "error:" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == f"interrupted: {what}", err


@pytest.mark.slow
def test_ctrl_c_in_train_is_one_line_and_the_run_resumes(embedded_store, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--store",
        embedded_store,
        "--out",
        out,
        "--n-features",
        256,
        "--k",
        8,
        "--batch-size",
        256,
        "--eval-rows",
        2048,
        "--checkpoint-every",
        5,
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = _popen(*args, "--tokens", 256 * 100_000)
    code, err = _interrupt_when(proc, lambda: checkpoint_dir(out) is not None)
    _said_interrupted(code, err, "the last checkpoint is kept; rerun the same command with --resume to continue")
    # where resume finds it: the Ctrl-C may have come in the middle of a checkpoint's swap
    step = json.loads((checkpoint_dir(out) / "state.json").read_text())["position"]["step"]
    r = saekit(*args, "--tokens", 256 * (step + 2), "--resume")  # a shorter budget, to finish quickly
    assert r.returncode == 0, r.stderr
    assert json.loads((checkpoint_dir(out) / "state.json").read_text())["position"]["step"] == step + 2


@pytest.mark.slow
def test_ctrl_c_in_harvest_is_one_line_and_keeps_the_finished_shards(tmp_path):
    out = tmp_path / "store"
    proc = _popen(
        "harvest", "--tokens", 2_000_000, "--shard-rows", 4096, "--chunk-rows", 1024, "--device", "cpu", "--out", out
    )
    code, err = _interrupt_when(proc, lambda: any((out / RECORDS_DIR).glob("*.json")))
    _said_interrupted(code, err, "finished shards are kept; rerun the same command with --resume to continue")
    assert open_store(out, allow_incomplete=True).n_rows >= 4096


@pytest.mark.parametrize("name", ["two\nlines", "carriage\rreturn", "escape\x1b[2Jcodes"])
def test_a_control_character_in_a_path_never_breaks_the_error_line(tmp_path, capsys, monkeypatch, name):
    """A path with a newline (or a terminal escape) in it is shown escaped: still one `error:` line."""
    code, _, err = in_process(capsys, monkeypatch, "info", tmp_path / name)
    line = one_error(code, err, "no store at")
    assert "\x1b" not in line and "\r" not in err

"""Each benchmark runs end to end at a tiny size and prints its ratios (the figures in docs/ come
from the full-size runs; this only keeps the scripts working as the library changes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "store.py": ["--rows", "20000", "--d", "64", "--rounds", "1", "--no-drop-caches"],
    "train.py": [
        "--d-in",
        "32",
        "--n-features",
        "128",
        "--k",
        "4",
        "--batch",
        "64",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--rows",
        "4096",
    ],
    "harvest.py": ["--models", "embedded", "--tokens", "4096", "--repeat", "1"],
    "pursuit.py": ["--small", "--repeats", "1"],
    "eval.py": ["--models", "embedded", "--sequences", "4", "--batch-size", "2", "--repeat", "1"],
    "encoders.py": ["--tiny"],
    "truth.py": ["--tiny", "--work", "truth"],
    "dictionaries.py": ["--tiny"],
    "remote_copy.py": ["--mb", "2", "--d", "64", "--shard-rows", "1024", "--repeat", "1", "--threads", "4"],
    "remote.py": ["--quick"],
    "dashboard.py": [
        "--rows",
        "4096",
        "--d",
        "64",
        "--n-features",
        "512",
        "--k",
        "8",
        "--pages",
        "20",
        "--repeat",
        "1",
    ],
}
RATIO_LINE = {
    "store.py": "targets:",
    "train.py": "step ratio",
    "harvest.py": "harvest/bare",
    "pursuit.py": "original gp / saekit gp",
    "eval.py": "sae_lens / saekit",
    "encoders.py": "gap closed =",
    "dictionaries.py": "lowest FVU:",
    "dashboard.py": "dashboard/bare time:",
    "remote_copy.py": "saekit/plain throughput",
    "remote.py": "cold ÷ local =",
    "truth.py": "Cross-check: sae-lens's TopK SAE",
}


@pytest.mark.parametrize("script", sorted(TINY))
@pytest.mark.slow
def test_benchmark_runs_and_prints_its_ratios(script, tmp_path):
    if script in ("remote_copy.py", "remote.py"):
        pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *TINY[script]],
        capture_output=True,
        text=True,
        # truth.py runs the study's 26 saekit commands (two seeds): each starts a Python with torch
        timeout=900 if script == "truth.py" else 300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert RATIO_LINE[script] in r.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_and_prints_its_table(tmp_path):
    """bench/gpu_check.py, the script a lent GPU machine runs, runs all its parts on the CPU at
    tiny sizes (the same code the GPU runs at full size) and ends with its table; on one device
    its comparisons must find no difference at all."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.rindex("\n====") :].splitlines()
    assert table[2].split() == ["part", "what", "figure", "expected"]
    for part in ("env", "harvest", "ddp", "pursuit", "eval"):
        assert any(line.split()[:3] == [part, "status", "ok"] for line in table[3:]), part
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert (out / "gpu_check.log").read_text().count("[harvest]") > 3
    assert parts["harvest"]["parity_dev_fp32_vs_cpu_fp32"]["bitwise_equal_frac"] == 1.0
    assert 1e-3 < parts["harvest"]["parity_bf16_vs_cpu_fp32"]["rel_err"] < 5e-2  # a bf16 model
    assert parts["ddp"]["torchrun_vs_plain"]["weights_max_abs_diff"] == 0.0
    assert parts["ddp"]["ddp_one_rank"]["weights_max_abs_diff"] == 0.0
    assert parts["pursuit"]["parity"]["rows_same_support"] == 1.0
    assert parts["eval"]["parity"]["ce_max_abs_diff"] == 0.0


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_gpu_shell_scripts_are_executable_and_parse(script):
    path = REPO / "bench" / script
    assert os.access(path, os.X_OK), f"{path} is not executable"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

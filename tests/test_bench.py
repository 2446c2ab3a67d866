"""Each benchmark runs end to end at a tiny size and prints its ratios (the figures in docs/ come
from the full-size runs; this only keeps the scripts working as the library changes)."""

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
}
RATIO_LINE = {
    "store.py": "targets:",
    "train.py": "step ratio",
    "harvest.py": "harvest/bare",
    "pursuit.py": "original gp / saekit gp",
    "eval.py": "sae_lens / saekit",
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_and_prints_its_ratios(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *TINY[script]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert RATIO_LINE[script] in r.stdout

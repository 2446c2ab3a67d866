"""`saekit demo` at a tiny size: harvest -> train -> pursue on the embedded default, then a second
run (through the CLI) that reuses every finished stage."""

import json
import math
import re
import sys

import pytest
from cli_checks import digest, in_process, one_error

import saekit.harvest.loop
import saekit.train.stage
from saekit.codes import CodesStore
from saekit.demo import DemoConfig, run
from saekit.errors import SaekitError

SIZES = {"tokens": 4096, "steps": 20, "rows": 400}  # all exposed as CLI flags too; 409 rows are held out


@pytest.mark.slow
def test_demo_runs_end_to_end_and_a_rerun_reuses_every_stage(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    res = run(DemoConfig(out=str(out), progress=False, **SIZES))
    k_l0 = math.floor(res.encoder_l0 + 1e-9)
    assert 0 < res.encoder_l0 <= 16  # a TopK(16) encoder
    report = json.loads((out / "pursue" / "report.json").read_text())
    assert report[0]["method"] == "encoder" and report[0]["n_rows"] == SIZES["rows"]
    ks = sorted({4, 8, 32, k_l0})
    assert [(e["method"], e["k"]) for e in report[1:]] == [(m, k) for m in ("gp", "mp") for k in ks]
    assert all(e["n_rows"] == SIZES["rows"] for e in report)
    assert (out / "pursue" / "fvu_vs_l0.png").stat().st_size > 5000
    assert (out / "train" / "sae" / "config.json").is_file() and (out / "store" / "zarr.json").is_file()
    assert f"gradient pursuit at k={k_l0} (the encoder's L0)" in res.headline()
    # on the first 400 of the 409 rows training held out (3687..4095), and ΔCE and KL of every entry
    # on the 2 whole sequences (127 rows each) inside them
    assert res.pursue.header["store rows"] == "3687..4086" and res.pursue.header["held out"].startswith("yes")
    assert all(e["downstream"]["n_tokens"] == 2 * 126 and e["downstream"]["kl_mean"] > 0 for e in report)
    gp, enc = (next(e for e in res.pursue.entries if (e.method, e.k) == key) for key in [("gp", k_l0), ("encoder", 16)])
    want = f"ΔCE {gp.downstream.delta_ce:.4f} vs {enc.downstream.delta_ce:.4f} nats per token, KL {gp.downstream.kl_mean:.4f}"
    assert want in res.headline()
    # the dashboard: the 32 most active latents, each under the encoder and gp at the encoder's L0
    assert res.dashboard == out / "dashboard" / "index.html" and res.dashboard.is_file()
    pages = sorted((out / "dashboard").glob("latent_*.html"))
    assert len(pages) == 32
    assert re.findall(r'<div class="col" data-encoding="([^"]+)"', pages[0].read_text()) == ["encoder", f"gp_k{k_l0}"]

    # Again, through the CLI with the same sizes: nothing is harvested, trained or pursued again.
    def never(*a, **kw):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(saekit.harvest.loop, "forward_acts", never)
    monkeypatch.setattr(saekit.train.stage, "train_step", never)
    monkeypatch.setattr(CodesStore, "write", never)
    from saekit.cli.main import main

    args = [f"--{k}={v}" for k, v in SIZES.items()]
    monkeypatch.setattr(sys, "argv", ["saekit", "demo", "--out", str(out), *args])
    with pytest.raises(SystemExit) as e:
        main()  # typer exits 0 on success
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "| gp |" in printed and "| ΔCE | CE rec. (zero) | KL mean |" in printed and "ΔCE" in printed.splitlines()[-3]
    assert printed.splitlines()[-1].startswith(f"dashboard: {out / 'dashboard' / 'index.html'}")
    again = json.loads((out / "pursue" / "report.json").read_text())
    untimed = lambda d: {k: untimed(v) if isinstance(v, dict) else v for k, v in d.items() if k != "seconds"}  # noqa: E731
    strip = lambda r: [untimed(e) for e in r]  # noqa: E731
    assert strip(again) == strip(report)

    # Other sizes into the same directory: refused in one line that suggests only what the demo
    # has (no --resume), and nothing of the finished run changes.
    before = digest(out)
    code, _, err = in_process(
        capsys, monkeypatch, "demo", "--out", out, *[f"--{k}={v}" for k, v in (SIZES | {"steps": 40}).items()]
    )
    line = one_error(
        code, err, f"{out} holds a demo run with other sizes (steps 20 -> 40); choose a new --out or delete {out}"
    )
    assert "--resume" not in line
    assert digest(out) == before


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = in_process(
        capsys, monkeypatch, "demo", "--out", tmp_path / "mine", *[f"--{k}={v}" for k, v in SIZES.items()]
    )
    one_error(code, err, "is not empty", "choose a new --out")
    assert digest(tmp_path / "mine") == {"notes.txt": digest(tmp_path / "mine" / "notes.txt")["notes.txt"]}


@pytest.mark.slow
def test_a_full_disk_in_the_demo_says_to_rerun_the_demo(tmpfs, capsys, monkeypatch):
    disk = tmpfs(256 << 10)  # less than the store's first shard (16 MiB: shards are written whole)
    args = ["demo", "--out", disk / "demo", *[f"--{k}={v}" for k, v in SIZES.items()]]
    code, _, err = in_process(capsys, monkeypatch, *args)
    line = one_error(code, err, f"disk full while writing {disk / 'demo'}", "rerun the same `saekit demo` command")
    assert "--resume" not in line
    tmpfs.remount(disk, 256 << 20)  # space freed
    code, out, err = in_process(capsys, monkeypatch, *args)
    assert code == 0, err
    assert "(the encoder's L0)" in out


def test_demo_config_errors_name_the_flag():
    with pytest.raises(SaekitError, match="--steps 0 must be positive"):
        DemoConfig(steps=0)
    with pytest.raises(SaekitError, match="--rows 410 is more than the 409 rows training holds out of --tokens 4096"):
        DemoConfig(tokens=4096, rows=410)

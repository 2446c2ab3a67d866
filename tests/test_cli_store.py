"""`saekit info` / `saekit verify` through saekit.cli.main:main, the wrapper that turns SaekitError into
one `error:` line and a non-zero exit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saekit.cli.main import main
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
    for args in (["--help"], ["info", "--help"], ["verify", "--help"], ["ls", "--help"]):
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


def test_ls_lists_every_store_under_a_root_including_damaged_ones(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    make_store(root / "team" / "a")
    make_store(root / "b", n=100, finalize=False)
    make_store(root / "c")
    (root / "c" / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {"saekit'
    )  # cut short
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a store")
    code, out, _ = cli(capsys, monkeypatch, "ls", root)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [str(root / "b"), str(root / "c"), str(root / "team" / "a")]
    b, c, a = lines
    assert "INCOMPLETE" in b and "--resume" in b and "64 rows" in b  # its one finished shard of 64 rows
    assert "unreadable:" in c and "zarr.json" in c
    assert "complete" in a and "200 rows" in a and f"{HOOK} (8)" in a and "model tiny-gpt2" in a and "sha256:" in a
    # a store is not searched inside, and an empty root says so
    code, out, _ = cli(capsys, monkeypatch, "ls", root / "notes")
    assert code == 0 and out.strip() == f"no saekit stores under {root / 'notes'}"


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
@pytest.mark.slow
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
    r = subprocess.run(
        [sys.executable, "-m", "saekit.cli.main", *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# --- a damaged store is one line for every command that reads it ---------------------------------


def saekit(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "saekit.cli.main", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_error_line(r: subprocess.CompletedProcess, *wants: str) -> None:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]  # progress bars may come before
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    for want in wants:
        assert want in errors[0], (want, errors[0])


@pytest.mark.parametrize("url", [False, True], ids=["path", "file:// URL"])
@pytest.mark.slow
def test_train_and_pursue_refuse_a_store_with_a_missing_shard(tmp_path, url):
    from saekit.sae import SparseAutoencoder

    make_store(tmp_path / "s")
    SparseAutoencoder(d_in=8, n_features=16, k=2).save(tmp_path / "sae")
    shard = f"acts/{HOOK}/c/1/0"
    (tmp_path / "s" / shard).unlink()  # e.g. lost in a copy: must not be read as zeros
    store = f"file://{tmp_path / 's'}" if url else tmp_path / "s"
    r = saekit(
        "train",
        "--store",
        store,
        "--out",
        tmp_path / "run",
        "--n-features",
        16,
        "--k",
        2,
        "--batch-size",
        32,
        "--tokens",
        320,
        "--eval-rows",
        32,
        "--device",
        "cpu",
        "--no-progress",
    )
    assert_one_error_line(r, shard, "missing")
    r = saekit(
        "pursue",
        "--store",
        store,
        "--sae",
        tmp_path / "sae",
        "--k",
        2,
        "--method",
        "gp",
        "--out",
        tmp_path / "codes",
        "--start-row",  # every row: a remote store's shard is checked when it is read
        0,
        "--device",
        "cpu",
    )
    assert_one_error_line(r, shard, "missing")
    if not url:  # a local store's shard files are checked when it is opened: nothing is written first
        assert not (tmp_path / "run").exists() and not (tmp_path / "codes").exists()


def edit_attrs(root, change) -> None:
    doc = json.loads((root / "zarr.json").read_text())
    change(doc["attributes"])
    (root / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage, want",
    [
        (
            lambda root: edit_attrs(root, lambda a: a.update(hooks={"../../x": 8})),
            "damaged attributes: hook name '../../x'",
        ),
        (lambda root: edit_attrs(root, lambda a: a.update(n_rows="lots")), "damaged attributes: n_rows"),
        (lambda root: edit_attrs(root, lambda a: a["meta"].update(ctx_len=99)), "content hash"),
        (
            lambda root: (root / "zarr.json").write_text('{"zarr_format": 3, "attri'),
            "zarr.json is damaged (not valid JSON)",
        ),
    ],
    ids=["hook ../../x", "n_rows 'lots'", "edited meta", "truncated zarr.json"],
)
@pytest.mark.slow
def test_info_and_verify_of_a_damaged_store_are_one_line(tmp_path, damage, want):
    make_store(tmp_path / "s")
    damage(tmp_path / "s")
    for cmd in ("info", "verify"):
        assert_one_error_line(saekit(cmd, tmp_path / "s"), want)


def test_verify_reports_statistics_that_do_not_match_the_rows(tmp_path, capsys, monkeypatch):
    from saekit.store import content_hash

    make_store(tmp_path / "s")

    def forge(a):  # statistics edited and the hash recomputed: only the rows can tell
        a["stats"][HOOK]["mean"][0] += 0.25
        a["content_hash"] = content_hash(a)

    edit_attrs(tmp_path / "s", forge)
    code, out, err = cli(capsys, monkeypatch, "verify", tmp_path / "s")
    assert code == 1 and f"stats.{HOOK}" in out and err.startswith("error:")


def test_verify_says_format_1_does_not_cover_the_statistics(tmp_path, capsys, monkeypatch):
    import hashlib

    make_store(tmp_path / "s")

    def downgrade(a):  # what saekit wrote before format 2: the hash left the statistics out
        a["format_version"] = 1
        keys = ("format", "format_version", "meta", "hooks", "shard_rows", "chunk_rows", "n_rows", "shards")
        doc = json.dumps({k: a[k] for k in keys}, sort_keys=True, separators=(",", ":"))
        a["content_hash"] = "sha256:" + hashlib.sha256(doc.encode()).hexdigest()

    edit_attrs(tmp_path / "s", downgrade)
    code, out, _ = cli(capsys, monkeypatch, "verify", tmp_path / "s")
    assert code == 0 and out.startswith("ok") and "format 1" in out and "does not cover the statistics" in out

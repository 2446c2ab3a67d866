"""`saekit pursue`: codes and report over a store, the held-out rows by default (and codes at an
offset), a stale encoder marked, resume, errors, the CLI, and the original promise (gradient pursuit
at the encoder's L0 beats the encoder) on an SAE trained by saekit."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import PAGE, in_process, one_error, tmpfs_bytes

from saekit.codes import CodesStore, open_codes
from saekit.encodings import encoder_codes
from saekit.errors import SaekitError
from saekit.metrics import fvu
from saekit.pursue import PursueConfig, run
from saekit.pursuit import METHODS, gradient_pursuit, reconstruct, refine, refit, to_dense
from saekit.reports import encoder_stale
from saekit.sae import ENCODER_STALE, SparseAutoencoder, load_sae
from saekit.store import create_store, open_store

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_pre"
D, N_ROWS, N_FEATURES = 16, 300, 64
FIELDS = {
    "method",
    "k",
    "l0",
    "fvu",
    "explained_variance",
    "mse",
    "cossim",
    "seconds",
    "n_rows",
    "codes",
    "source",
    "downstream",
}


def _store(path: Path, d: int = D, n: int = N_ROWS) -> Path:
    # shards of 128 rows: 3 shards, the last one partial, so resume and padding are exercised.
    w = create_store(path, {HOOK: d}, n_rows=n, meta={"model": "synthetic"}, shard_rows=128, chunk_rows=32)
    g = torch.Generator().manual_seed(0)
    # sparse nonnegative mixtures of a few directions plus noise and an offset: SAE-like data.
    atoms = torch.randn(24, d, generator=g)
    coef = torch.rand(n, 24, generator=g) * (torch.rand(n, 24, generator=g) < 0.15)
    x = coef @ atoms + 0.05 * torch.randn(n, d, generator=g) + 3.0
    w.append({HOOK: x}, torch.arange(n), torch.arange(n) % 16)
    w.finalize()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("pursue") / "store")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, store) -> Path:
    """A TopK SAE with input normalization (so raw vs normalized dictionary matters)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=D, n_features=N_FEATURES, k=4)
    st = open_store(store).stats()
    sae.set_input_normalization(st.mean, st.mean_sq_norm)
    out = tmp_path_factory.mktemp("sae") / "run"
    sae.save(out / "sae")  # a training run directory: the SAE lives in run/sae
    return out


def _cfg(tmp_path, store, sae_dir, **kw) -> PursueConfig:
    # Every row of the store (--start-row 0), so the mechanisms meet several shards; the default,
    # the held-out rows, has its own tests below.
    base = dict(
        store=str(store),
        sae=str(sae_dir),
        out=str(tmp_path / "out"),
        k=[2, 6],
        methods=["gp", "mp"],
        batch_size=50,
        start_row=0,
        progress=False,
    )
    return PursueConfig(**(base | kw))


def _arrays(out: Path) -> dict[str, np.ndarray]:
    c = open_codes(out)
    arrays = {"rows": c.rows().numpy()}
    for g in c.groups:
        codes = c.codes(g)
        arrays[g + "/indices"], arrays[g + "/values"] = codes.indices.numpy(), codes.values.numpy()
    return arrays


def _same_report(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    drop = lambda r: [{k: v for k, v in e.items() if k != "seconds"} for e in r]  # noqa: E731
    assert drop(ra) == drop(rb)


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def test_report_compares_every_entry_on_the_same_rows(tmp_path, store, sae_dir):
    # an extra encoder: an MLP encoder over the same dictionary, saved as a run directory
    base = SparseAutoencoder.load(sae_dir / "sae")
    torch.manual_seed(1)
    mlp = SparseAutoencoder(decoder=base.decoder, k=3, d_hidden=8, n_hidden=1)
    mlp.save(tmp_path / "mlp-run" / "sae")
    res = run(_cfg(tmp_path, store, sae_dir, encoders=[str(tmp_path / "mlp-run")]))
    report = json.loads((res.out / "report.json").read_text())
    assert [(e["method"], e["k"]) for e in report] == [
        ("encoder", 4),
        ("encoder:mlp-run", 3),
        ("gp", 2),
        ("gp", 6),
        ("mp", 2),
        ("mp", 6),
    ]
    assert report[1]["source"] == str(tmp_path / "mlp-run") and report[1]["l0"] <= 3
    for e in report:
        assert FIELDS <= set(e)
        assert e["n_rows"] == N_ROWS and e["downstream"] is None  # measured only with --downstream
        assert math.isclose(e["explained_variance"], 1 - e["fvu"], rel_tol=1e-9)
        if e["codes"]:
            assert e["l0"] <= e["k"] + 1e-9 and e["seconds"] > 0
    # more nonzeros, less error; gradient pursuit at least as good as matching pursuit.
    by = {(e["method"], e["k"]): e for e in report}
    assert by["gp", 6]["fvu"] < by["gp", 2]["fvu"] and by["mp", 6]["fvu"] < by["mp", 2]["fvu"]
    assert by["gp", 6]["fvu"] <= by["mp", 6]["fvu"] * (1 + 1e-6)
    md = (res.out / "report.md").read_text()
    assert "| gp | 6 |" in md and "| encoder | 4 |" in md and res.table in md
    png = (res.out / "fvu_vs_l0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_codes_are_the_pursuits_codes_and_the_report_measures_them(tmp_path, store, sae_dir):
    res = run(_cfg(tmp_path, store, sae_dir, k=[5], methods=["gp"]))
    codes = open_codes(res.out)
    assert codes.complete and codes.groups == {"gp_k5": 5}
    assert torch.equal(codes.rows(), torch.arange(N_ROWS))
    c = codes.codes("gp_k5")
    assert c.indices.shape == c.values.shape == (N_ROWS, 5)
    assert bool((c.values >= 0).all())
    # exactly what gradient pursuit gives against the SAE's raw-space dictionary
    sae = SparseAutoencoder.load(sae_dir / "sae")
    x = open_store(store).rows(None, 0, N_ROWS).float()
    W, b = sae.decoder.raw_dictionary()
    ref = gradient_pursuit(x, W, 5, b_dec=b, dense=False)
    assert torch.equal(c.indices, ref.indices) and torch.equal(c.values, ref.values)
    # codes are in the SAE's units: its own decode reconstructs raw activations from them
    with torch.no_grad():
        recon = sae.decode(to_dense(c, sae.n_features))
    torch.testing.assert_close(recon, reconstruct(c, W, b), rtol=1e-4, atol=1e-4)
    # FVU against the mean of all rows, not per batch (batch_size 50 here)
    entry = next(e for e in res.entries if e.method == "gp")
    assert math.isclose(entry.fvu, float(fvu(x, reconstruct(c, W, b))), rel_tol=1e-5)


def test_rows_takes_the_first_rows_in_store_order(tmp_path, store, sae_dir):
    full = run(_cfg(tmp_path / "a", store, sae_dir, k=[3], methods=["mp"]))
    part = run(_cfg(tmp_path / "b", store, sae_dir, k=[3], methods=["mp"], rows=100))
    assert all(e.n_rows == 100 for e in part.entries)
    a, b = _arrays(full.out), _arrays(part.out)
    assert b["rows"].tolist() == list(range(100))
    assert np.array_equal(a["mp_k3/indices"][:100], b["mp_k3/indices"])
    assert np.array_equal(a["mp_k3/values"][:100], b["mp_k3/values"])


def test_same_inputs_same_bytes(tmp_path, store, sae_dir):
    a = run(_cfg(tmp_path / "a", store, sae_dir, k=[3], methods=["gp"]))
    b = run(_cfg(tmp_path / "b", store, sae_dir, k=[3], methods=["gp"]))
    files = sorted(p.relative_to(a.out / "codes.zarr") for p in (a.out / "codes.zarr").rglob("c/*/*") if p.is_file())
    assert files
    for f in files:
        assert (a.out / "codes.zarr" / f).read_bytes() == (b.out / "codes.zarr" / f).read_bytes()


# --------------------------------------------------------------------------------------------
# the held-out rows by default; a stale encoder
# --------------------------------------------------------------------------------------------


def _train(store: Path, out: Path, **kw) -> Path:
    """A tiny `saekit train` run on `store` that holds out its last 100 rows (the default rule would hold out 30)."""
    from saekit.train import TrainConfig
    from saekit.train import run as train

    settings = dict(n_features=N_FEATURES, k=4, batch_size=50, tokens=100, eval_rows=100, checkpoint_every=0)
    return train(TrainConfig(store=str(store), out=str(out), device="cpu", progress=False, **(settings | kw))).out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store) -> Path:
    return _train(store, tmp_path_factory.mktemp("trained") / "run")


def test_the_default_rows_are_the_ones_training_held_out(tmp_path, store, trained):
    gp3 = dict(k=[3], methods=["gp"], start_row=None)
    held = run(_cfg(tmp_path / "held", store, trained, **gp3))
    assert all(e.n_rows == 100 for e in held.entries)  # the run's config.json: its last 100 rows
    assert held.header["store rows"] == "200..299" and held.header["held out"].startswith(
        "yes: inside the store's last 100 rows"
    )
    assert "- store rows: `200..299`" in (held.out / "report.md").read_text()
    # codes at an offset read back as the same rows' codes in a run over every row, and the report
    # measures those rows
    everything = run(_cfg(tmp_path / "all", store, trained, **(gp3 | {"start_row": 0})))
    assert everything.header["held out"].startswith("no: 200 of these rows trained the SAE")
    got, want = _arrays(held.out), _arrays(everything.out)
    assert open_codes(held.out).start_row == 200 and got["rows"].tolist() == list(range(200, N_ROWS))
    assert all(np.array_equal(got[key], want[key][200:]) for key in ("gp_k3/indices", "gp_k3/values"))
    W, b = load_sae(trained).decoder.raw_dictionary()
    x = open_store(store).rows(None, 200, N_ROWS).float()
    c = open_codes(held.out).codes("gp_k3")
    assert math.isclose(held.entries[1].fvu, float(fvu(x, reconstruct(c, W, b))), rel_tol=1e-5)
    # --rows: the first of the held-out rows
    assert run(_cfg(tmp_path / "part", store, trained, rows=40, **gp3)).header["store rows"] == "200..239"
    # the run's sae/ copied away still knows the rows that trained it: the same last 100 rows
    bare = run(_cfg(tmp_path / "bare", store, shutil.copytree(trained / "sae", tmp_path / "sae"), **gp3))
    assert bare.header["store rows"] == "200..299" and bare.header["held out"].startswith("yes")


def test_the_rows_an_sae_trained_on_travel_with_it(tmp_path, store):
    """Held out by --eval-rows 10 (fewer than the default rule's 30): the SAE's own record says so
    wherever it goes (a copy of sae/, its sae-lens export, a run that started from it), so the
    report never calls rows that trained it held out. An SAE whose training saekit cannot see is
    never said to have missed any row."""
    import sae_lens

    gp3 = dict(k=[3], methods=["gp"], start_row=None)
    dictionary = _train(store, tmp_path / "dict", eval_rows=10)  # trained on rows 0..289
    copy = shutil.copytree(dictionary / "sae", tmp_path / "copy")
    mlp = _train(store, tmp_path / "mlp", eval_rows=50, from_pretrained=str(copy), d_hidden=8, n_hidden=1)
    for i, spec in enumerate([dictionary, copy, dictionary / "sae_lens", mlp, mlp / "sae"]):
        res = run(_cfg(tmp_path / f"p{i}", store, spec, **gp3))
        assert res.header["store rows"] == "290..299", spec
        assert res.header["held out"].startswith("yes: inside the store's last 10 rows"), spec
    # a dictionary from outside saekit: nobody knows its training rows
    torch.manual_seed(0)
    foreign = tmp_path / "foreign"
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=N_FEATURES)).save_model(foreign)
    started = _train(store, tmp_path / "started", eval_rows=10, from_pretrained=str(foreign), k=4)
    for i, spec in enumerate([foreign, started]):
        held = run(_cfg(tmp_path / f"f{i}", store, spec, **gp3)).header["held out"]
        assert "never saw" not in held and "does not know" in held, held


def test_an_encoder_not_trained_with_its_dictionary_is_marked_stale(tmp_path, store, trained):
    # --codes pursuit trains only the dictionary: the encoder is left as it was
    dict_run = _train(store, tmp_path / "dict", codes="pursuit")
    assert load_sae(dict_run).metadata[ENCODER_STALE] is True and ENCODER_STALE not in load_sae(trained).metadata
    encoders = [str(trained), str(dict_run / "sae_lens")]  # the sae-lens export says so too
    cfg = _cfg(tmp_path / "p", store, dict_run, k=[3], methods=["gp", "refit"], start_row=None, encoders=encoders)
    res = run(cfg)
    methods = [e["method"] for e in json.loads((res.out / "report.json").read_text())]
    # what starts from the stale encoder is marked too
    stale = ["encoder (stale)", "encoder:run", "encoder:sae_lens (stale)", "encoder@k3 (stale)", "gp", "refit (stale)"]
    assert methods == stale
    md = (res.out / "report.md").read_text()
    note = "`encoder (stale)`, `encoder:sae_lens (stale)`, `encoder@k3 (stale)`, `refit (stale)`: not trained with"
    assert "| encoder (stale) | 4 |" in md and note in md
    # a run from before saekit recorded it in the SAE: its config.json says --codes pursuit
    old = Path(shutil.copytree(dict_run, tmp_path / "old"))
    config = json.loads((old / "sae" / "config.json").read_text())
    del config["metadata"][ENCODER_STALE]
    (old / "sae" / "config.json").write_text(json.dumps(config))
    assert not encoder_stale(load_sae(old / "sae"), tmp_path / "elsewhere") and encoder_stale(load_sae(old), old)


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start_row, n_shards", [(0, 3), (100, 2)], ids=["from row 0", "from row 100"])
def test_resume_after_interruption_gives_the_same_codes(tmp_path, store, sae_dir, monkeypatch, start_row, n_shards):
    # from row 100 the code shards (128 rows each) cover store rows 100..227 and 228..299: not the store's shards
    clean = run(_cfg(tmp_path / "clean", store, sae_dir, start_row=start_row))
    writes = []
    real_write = CodesStore.write

    def dying_write(self, group, index, arrays, seconds):
        if len(writes) == 6:  # rows + 4 groups of shard 0, then rows of shard 1: killed here
            raise KeyboardInterrupt
        writes.append((group, index))
        real_write(self, group, index, arrays, seconds)

    monkeypatch.setattr(CodesStore, "write", dying_write)
    cfg = _cfg(tmp_path / "killed", store, sae_dir, start_row=start_row)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert not open_codes(cfg.out, allow_incomplete=True).complete
    assert not (Path(cfg.out) / "report.json").exists()
    with pytest.raises(SaekitError, match="incomplete"):
        open_codes(cfg.out)

    monkeypatch.setattr(CodesStore, "write", real_write)
    redone = []
    monkeypatch.setattr(
        CodesStore, "write", lambda self, g, i, a, s: (redone.append((g, i)), real_write(self, g, i, a, s))
    )
    cfg.resume = True
    run(cfg)
    # finished shards were kept, not recomputed
    assert not set(redone) & set(writes) and len(redone) == n_shards * 5 - len(writes)
    a, b = _arrays(clean.out), _arrays(Path(cfg.out))
    assert a.keys() == b.keys() and b["rows"].tolist() == list(range(start_row, N_ROWS))
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    _same_report(clean.out, Path(cfg.out))


def test_resume_of_a_finished_run_recomputes_nothing(tmp_path, store, sae_dir, monkeypatch):
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    first = run(cfg)
    report = (first.out / "report.json").read_text()
    monkeypatch.setattr(CodesStore, "write", lambda *a: pytest.fail("a finished shard was rewritten"))
    cfg.resume = True
    again = run(cfg)
    # same codes, same metrics; only the measured encoder time may differ
    _same_report(first.out, again.out)
    assert json.loads(report)[1]["seconds"] == again.entries[1].seconds


def test_a_corrupt_shard_is_recomputed_on_resume(tmp_path, store, sae_dir):
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    clean = _arrays(run(cfg).out)
    shard = Path(cfg.out) / "codes.zarr" / "gp_k3" / "values" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cfg.resume = True
    run(cfg)
    assert np.array_equal(_arrays(Path(cfg.out))["gp_k3/values"], clean["gp_k3/values"])


def _run_killed_before_a_rename(cfg: PursueConfig) -> None:
    real_replace = os.replace

    def killed(src, dst):  # the shard's temp file is written, then the process dies before its rename
        if str(src).endswith(".partial") and "/gp_k3/values/c/1/" in str(dst):
            os._exit(9)
        real_replace(src, dst)

    os.replace = killed
    run(cfg)


def test_temp_files_of_a_failed_shard_write_are_removed_on_resume(tmp_path, store, sae_dir):
    import multiprocessing as mp

    clean = _arrays(run(_cfg(tmp_path / "clean", store, sae_dir, k=[3], methods=["gp"])).out)
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    p = mp.get_context("fork").Process(target=_run_killed_before_a_rename, args=(cfg,))  # another pid, as after a kill
    p.start()
    p.join(120)
    assert p.exitcode == 9 and list(Path(cfg.out).rglob("*.partial"))
    cfg.resume = True
    run(cfg)
    assert list(Path(cfg.out).rglob("*.partial")) == []
    got = _arrays(Path(cfg.out))
    assert all(np.array_equal(got[k], clean[k]) for k in clean)


def _run_killed_while_creating_codes(cfg: PursueConfig, after_attrs: bool) -> None:
    import saekit.store.shards as shards

    real = shards.write_group_attrs

    def killed(root, attrs):  # codes.zarr's arrays exist; the process dies before (or just after) its attributes
        if after_attrs:
            real(root, attrs)
        os._exit(9)

    shards.write_group_attrs = killed
    run(cfg)


@pytest.mark.parametrize("after_attrs", [False, True], ids=["before the attributes", "after the attributes"])
def test_a_kill_while_codes_zarr_is_created_is_recognised_and_resumed(tmp_path, store, sae_dir, after_attrs):
    import multiprocessing as mp

    clean = _arrays(run(_cfg(tmp_path / "clean", store, sae_dir, k=[3], methods=["gp"])).out)
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    p = mp.get_context("fork").Process(target=_run_killed_while_creating_codes, args=(cfg, after_attrs))
    p.start()
    p.join(120)
    root = Path(cfg.out) / "codes.zarr"
    assert (
        p.exitcode == 9
        and (root / "gp_k3" / "values" / "zarr.json").is_file()
        and (root / ".saekit-creating").is_file()
    )
    _one_line_error("already exists: pass --resume", run, cfg)
    cfg.resume = True
    run(cfg)
    assert not (root / ".saekit-creating").exists()
    got = _arrays(Path(cfg.out))
    assert got.keys() == clean.keys() and all(np.array_equal(got[k], clean[k]) for k in clean)


def test_reading_codes_checks_each_shard_against_its_record(tmp_path, store, sae_dir):
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    clean = _arrays(run(cfg).out)
    root = Path(cfg.out) / "codes.zarr"
    raw = bytearray((root / "gp_k3/values/c/1/0").read_bytes())
    raw[10] ^= 0xFF  # a coefficient changed on disk: zarr reads it without complaint
    (root / "gp_k3/values/c/1/0").write_bytes(bytes(raw))
    (root / "rows/c/2").unlink()  # zarr would read a missing shard as zeros
    codes = open_codes(cfg.out)
    assert np.array_equal(codes.codes("gp_k3", 0, 128).values.numpy(), clean["gp_k3/values"][:128])  # shard 0 is fine
    _one_line_error("gp_k3/values/c/1/0 is corrupt", codes.codes, "gp_k3")
    _one_line_error("gp_k3/values/c/1/0 is corrupt", codes.codes, "gp_k3", 200, 210)
    _one_line_error("rows/c/2 is missing", codes.rows)


def test_resume_refuses_other_settings(tmp_path, store, sae_dir):
    cfg = _cfg(tmp_path, store, sae_dir, k=[3], methods=["gp"])
    run(cfg)
    with pytest.raises(SaekitError, match=r"differs in: k\b") as e:
        run(_cfg(tmp_path, store, sae_dir, k=[4], methods=["gp"], resume=True))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# errors: one line each, naming the flag and what to do
# --------------------------------------------------------------------------------------------


def _one_line_error(match: str, fn, *a, **kw) -> str:
    with pytest.raises(SaekitError, match=match) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_errors(tmp_path, store, sae_dir):
    other = _store(tmp_path / "wide", d=D + 8, n=64)
    msg = _one_line_error("d_in=16", run, _cfg(tmp_path, other, sae_dir))
    assert "d_model=24" in msg
    _one_line_error("--k 0 must be positive", _cfg, tmp_path, store, sae_dir, k=[0])
    _one_line_error("--k -3 must be positive", _cfg, tmp_path, store, sae_dir, k=[2, -3])
    _one_line_error(
        f"--k {N_FEATURES + 1} is larger than the SAE's n_features {N_FEATURES}",
        run,
        _cfg(tmp_path, store, sae_dir, k=[N_FEATURES + 1]),
    )
    msg = _one_line_error("unknown --method 'lasso'", _cfg, tmp_path, store, sae_dir, methods=["gp", "lasso"])
    assert all(m in msg for m in METHODS)
    _one_line_error(
        "--rows 201 from --start-row 100 runs past the store's 300 rows: pass at most 200",
        run,
        _cfg(tmp_path, store, sae_dir, start_row=100, rows=201),
    )
    _one_line_error("--start-row 300 is past the store's last row", run, _cfg(tmp_path, store, sae_dir, start_row=300))
    _one_line_error("--start-row -1 must be >= 0", _cfg, tmp_path, store, sae_dir, start_row=-1)
    # the default: the held-out rows (here the default rule's last 30), no more
    msg = _one_line_error(
        re.escape("--rows 31 is more than the store's 30 held-out rows (270..299): pass at most 30"),
        run,
        _cfg(tmp_path, store, sae_dir, start_row=None, rows=31),
    )
    assert "--start-row" in msg
    tiny = _store(tmp_path / "tiny", n=9)  # a tenth of 9 rows, rounded down, is none
    _one_line_error("too few to hold any out", run, _cfg(tmp_path, tiny, sae_dir, start_row=None))
    _one_line_error("no SAE directory at", run, _cfg(tmp_path, store, str(tmp_path / "nope")))
    # this synthetic store keeps no sequences to rerun a model on (tests/test_eval.py: the embedded one)
    _one_line_error("does not record how its rows form sequences", run, _cfg(tmp_path, store, sae_dir, downstream=True))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    _one_line_error("already exists: pass --resume", run, _cfg(tmp_path, store, sae_dir, out=str(tmp_path / "taken")))
    _one_line_error(
        "not a `saekit pursue` output", run, _cfg(tmp_path, store, sae_dir, out=str(tmp_path / "taken"), resume=True)
    )
    # nothing was created by the failed runs
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# the CLI, as a user runs it
# --------------------------------------------------------------------------------------------


def _saekit(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saekit.cli.main", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_cli_runs_and_prints_the_table(tmp_path, store, sae_dir):
    p = _saekit(
        "pursue",
        "--store",
        store,
        "--sae",
        sae_dir,
        "--k",
        2,
        "--k",
        4,
        "--method",
        "gp",
        "--out",
        tmp_path / "o",
        "--batch-size",
        64,
    )
    assert p.returncode == 0, p.stderr
    assert "| gp | 4 |" in p.stdout and "| encoder | 4 |" in p.stdout
    assert [e["k"] for e in json.loads((tmp_path / "o" / "report.json").read_text())] == [4, 2, 4]


def test_cli_errors_are_one_line_and_exit_nonzero(tmp_path, store, sae_dir, capsys, monkeypatch):
    p = _saekit("pursue", "--store", store, "--sae", sae_dir, "--k", 2, "--method", "nope", "--out", tmp_path / "o")
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: unknown --method 'nope'"), p.stderr
    # the rest through the same entry point, in-process (each subprocess costs seconds of imports)
    from saekit.cli.main import main

    def cli(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["saekit", "pursue", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr().err

    base = ["--store", store, "--sae", sae_dir, "--out", tmp_path / "o2"]
    wide = _store(tmp_path / "wide", d=D + 8, n=64)
    cases = [
        (["--k", 0, *base], "--k 0 must be positive"),
        (["--k", 999, *base], "--k 999 is larger than the SAE's n_features 64"),
        (["--k", 2, "--store", wide, "--sae", sae_dir, "--out", tmp_path / "o3"], "d_in=16 but hook"),
        ([*base], "--k is required"),
    ]
    for args, want in cases:
        code, err = cli(*args)
        assert code == 1 and err.startswith("error: ") and want in err and err.strip().count("\n") == 0, err
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "f").write_text("")
    code, err = cli("--k", 2, *base)
    assert code == 1 and "already exists: pass --resume" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("where", ["create", "codes", "report"])
def test_a_full_disk_is_one_line_and_resume_finishes_the_same_run(
    tmp_path, store, sae_dir, tmpfs, capsys, monkeypatch, where
):
    ref = run(_cfg(tmp_path / "ref", store, sae_dir)).out
    codes, report = tmpfs_bytes(ref / "codes.zarr"), tmpfs_bytes(ref / "report.json") + tmpfs_bytes(ref / "report.md")
    # The disk fills while codes.zarr is created, halfway through the code shards, or at the plot
    # (the last file written).
    disk = tmpfs({"create": 4 * PAGE, "codes": codes // 2, "report": codes + report + 2 * PAGE}[where])
    args = [
        "pursue",
        "--store",
        store,
        "--sae",
        sae_dir,
        "--k",
        2,
        "--k",
        6,
        "--method",
        "gp",
        "--method",
        "mp",
        "--batch-size",
        50,
        "--start-row",
        0,
        "--out",
        disk / "out",
    ]
    code, _, err = in_process(capsys, monkeypatch, *args)
    one_error(code, err, f"disk full while writing {disk / 'out'}", "--resume", "finished code shards are kept")
    if where != "create":
        assert open_codes(disk / "out", allow_incomplete=True).complete == (where == "report")

    tmpfs.remount(disk, 64 << 20)  # space freed
    code, _, err = in_process(capsys, monkeypatch, *args, "--resume")
    assert code == 0, err
    a, b = _arrays(ref), _arrays(disk / "out")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    _same_report(ref, disk / "out")
    assert (disk / "out" / "fvu_vs_l0.png").read_bytes() == (ref / "fvu_vs_l0.png").read_bytes()


def test_help(capsys, monkeypatch):
    from saekit.cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", "pursue", "--help"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--encoder" in out and "--resume" in out


# --------------------------------------------------------------------------------------------
# the original promise, on the embedded default
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gradient_pursuit_beats_the_encoder_of_a_saekit_sae(tmp_path, embedded_store):
    """At k = the encoder's mean L0 (rounded down), gradient pursuit against a saekit-trained
    SAE's own dictionary reconstructs better than the SAE's encoder."""
    from saekit.train import TrainConfig
    from saekit.train import run as train

    res = train(
        TrainConfig(
            store=str(embedded_store),
            out=str(tmp_path / "run"),
            n_features=512,
            k=12,
            batch_size=512,
            tokens=512 * 60,
            eval_rows=4096,
            eval_every=60,
            checkpoint_every=0,
            device="cpu",
            progress=False,
        )
    )
    st = open_store(embedded_store)
    held = st.rows(None, st.n_rows - 4096, st.n_rows)  # the rows training held out: pursue's default
    with torch.no_grad():
        l0 = float((res.sae.eval().encode(held) != 0).sum(1).float().mean())
    k = int(math.floor(l0 + 1e-9))
    report = run(
        PursueConfig(
            store=str(embedded_store),
            sae=str(res.out),
            out=str(tmp_path / "p"),
            k=[k],
            methods=["gp"],
            progress=False,
            encoders=[str(res.out / "sae_lens")],
        )
    ).entries
    encoder, lens_encoder, gp = report
    assert gp.n_rows == 4096 and math.isclose(encoder.l0, l0, rel_tol=1e-6)
    assert gp.l0 <= encoder.l0 + 1e-9
    assert gp.fvu < encoder.fvu, (gp, encoder)
    # the sae-lens export of the same SAE loads as an encoder and measures the same
    assert math.isclose(lens_encoder.fvu, encoder.fvu, rel_tol=1e-3) and math.isclose(
        lens_encoder.l0, encoder.l0, rel_tol=1e-3
    )


# --------------------------------------------------------------------------------------------
# the encoder's gap, decomposed: refit and encoder+gp
# --------------------------------------------------------------------------------------------

GAP = dict(k=[2, 4], methods=["gp", "refit", "encoder+gp"], refine=2)


def test_refit_and_encoder_gp_split_the_encoders_gap(tmp_path, store, trained):
    # the trained TopK k 4 SAE on its 100 held-out rows, in one batch (the encoder codes below too)
    res = run(_cfg(tmp_path, store, trained, start_row=None, batch_size=100, **GAP))
    by = {(e.method, e.k): e for e in res.entries}
    assert list(by) == [
        ("encoder", 4),
        ("encoder@k2", 2),  # the encoder's top-2: the like-for-like row at k 2
        ("gp", 2),
        ("gp", 4),
        ("refit", 2),
        ("refit", 4),
        ("encoder+gp", 2),
        ("encoder+gp", 4),
    ]
    codes = open_codes(res.out)
    assert set(codes.groups) == {"gp_k2", "gp_k4", "refit_k2", "refit_k4", "egp_k2", "egp_k4"}
    assert by["encoder+gp", 4].codes == "codes.zarr/egp_k4"
    sae = load_sae(trained)
    W, b = sae.decoder.raw_dictionary()
    x = open_store(store).rows(None, 200, N_ROWS).float()
    for k, encoder_row in ((2, by["encoder@k2", 2]), (4, by["encoder", 4])):
        # the stored codes are refit and refine of the encoder's codes at k
        start = encoder_codes(sae, x, k)
        for group, want in (
            (f"refit_k{k}", refit(x, W, start, b_dec=b)),
            (f"egp_k{k}", refine(x, W, start, 2, b_dec=b)),
        ):
            got = codes.codes(group)
            assert torch.equal(got.indices, want.indices.int().long()) and torch.equal(got.values, want.values)
        assert torch.equal(codes.codes(f"refit_k{k}").indices, start.indices)  # the encoder's support
        assert math.isclose(encoder_row.fvu, float(fvu(x, reconstruct(start, W, b))), rel_tol=1e-5)
        assert by["refit", k].fvu <= encoder_row.fvu and by["encoder+gp", k].fvu <= encoder_row.fvu
        assert by["refit", k].l0 <= encoder_row.l0 and by["encoder+gp", k].l0 <= k
    # the decomposition: each k's four FVUs and the shares of the encoder -> gp gap
    assert [(g.k, g.metric) for g in res.gaps] == [(2, "FVU"), (4, "FVU")]
    for g, enc in zip(res.gaps, (by["encoder@k2", 2], by["encoder", 4])):
        k = g.k
        assert (g.encoder, g.refit, g.encoder_gp, g.gp) == (
            enc.fvu,
            by["refit", k].fvu,
            by["encoder+gp", k].fvu,
            by["gp", k].fvu,
        )
        assert math.isclose(g.coefficients, (enc.fvu - g.refit) / (enc.fvu - g.gp))
        assert math.isclose(g.coefficients + g.support, 1) and g.coefficients > 0
    md = (res.out / "report.md").read_text()
    assert "Gap decomposition" in md and res.table in md
    assert re.search(r"\| 4 \| FVU \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| -?\d+% \| -?\d+% \|", md)
    report = json.loads((res.out / "report.json").read_text())
    gp4 = next(e for e in report if (e["method"], e["k"]) == ("gp", 4))
    assert gp4["gap"] == [res.gaps[1]._asdict()]
    assert all(e["gap"] is None for e in report if e["method"] != "gp")


def _code_files(out: Path) -> dict[str, bytes]:
    root = out / "codes.zarr"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("c/*/*") if p.is_file()}


def test_resume_of_refit_and_encoder_gp_gives_the_same_bytes(tmp_path, store, sae_dir, monkeypatch):
    clean = run(_cfg(tmp_path / "clean", store, sae_dir, **GAP))  # a random encoder, every row, 3 shards
    by = {(e.method, e.k): e.fvu for e in clean.entries}
    assert by["refit", 4] <= by["encoder", 4] and by["refit", 2] <= by["encoder@k2", 2]
    real_write = CodesStore.write
    writes = []

    def dying_write(self, group, index, arrays, seconds):
        if len(writes) == 10:  # rows + 6 groups of shard 0, then rows and 2 groups of shard 1
            raise KeyboardInterrupt
        writes.append(group)
        real_write(self, group, index, arrays, seconds)

    monkeypatch.setattr(CodesStore, "write", dying_write)
    cfg = _cfg(tmp_path / "killed", store, sae_dir, **GAP)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(CodesStore, "write", real_write)
    cfg.resume = True
    # another --refine would make other encoder+gp codes: refused
    _one_line_error(
        "differs in: refine", run, _cfg(tmp_path / "killed", store, sae_dir, **(GAP | {"refine": 3}), resume=True)
    )
    run(cfg)
    files = _code_files(clean.out)
    assert any("egp_k4" in f for f in files) and files == _code_files(Path(cfg.out))
    _same_report(clean.out, Path(cfg.out))


def test_refit_needs_an_encoder(tmp_path, store, sae_dir):
    sae = SparseAutoencoder.load(sae_dir / "sae")
    with torch.no_grad():
        sae.encoder.W_enc.zero_()
        sae.encoder.b_enc.zero_()
    sae.save(tmp_path / "dictionary")
    for methods in (["gp", "refit"], ["encoder+gp"]):
        cfg = _cfg(tmp_path, store, tmp_path / "dictionary", methods=methods)
        msg = _one_line_error("has only a dictionary", run, cfg)
        assert f"--method {methods[-1]} needs an SAE encoder" in msg and not Path(cfg.out).exists()
    # the pursuits alone need no encoder
    assert run(_cfg(tmp_path, store, tmp_path / "dictionary", methods=["gp"], k=[2])).entries


@pytest.mark.slow
def test_cli_decomposes_the_gap(tmp_path, store, sae_dir):
    args = ["pursue", "--store", store, "--sae", sae_dir, "--k", 2, "--k", 4, "--out", tmp_path / "o"]
    p = _saekit(*args, "--method", "gp", "--method", "refit", "--method", "encoder+gp", "--refine", 2)
    assert p.returncode == 0, p.stderr
    assert "| encoder@k2 | 2 |" in p.stdout and "| encoder+gp | 4 |" in p.stdout and "| refit | 2 |" in p.stdout
    assert "Gap decomposition" in p.stdout and "| 2 | FVU |" in p.stdout and "| 4 | FVU |" in p.stdout

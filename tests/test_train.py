"""`saekit train` on the embedded default's cache: the three things it trains (1a-1c), resume,
two ranks, the CLI and config file, and every user-facing error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import PAGE, digest, in_process, one_error, tmpfs_bytes

import saekit.train.loss
import saekit.train.stage
from saekit.errors import SaekitError
from saekit.sae import SparseAutoencoder
from saekit.store import create_store, open_store
from saekit.train import read_run_config, run
from saekit.train.stage import TrainConfig, read_metrics

REPO = Path(__file__).resolve().parents[1]
N_EVAL = 2048


def cfg(store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        n_features=512,
        k=16,
        batch_size=256,
        tokens=256 * 200,
        device="cpu",
        progress=False,
        checkpoint_every=0,
        eval_rows=N_EVAL,
    )
    return TrainConfig(**(base | kw))


def evals(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "eval/fvu" in m]


@pytest.fixture(scope="module")
def sae_run(embedded_store, tmp_path_factory):
    """1a: a new TopK SAE (d 128 -> 512 latents, k 16), 300 steps of 256 rows."""
    return run(cfg(embedded_store, tmp_path_factory.mktemp("train") / "topk", tokens=256 * 300, dead_tokens=20_000))


# --- 1a, 1b, 1c ---------------------------------------------------------------------------


def test_new_topk_sae_clearly_beats_the_mean(sae_run):
    first, last = evals(sae_run.out)[0], evals(sae_run.out)[-1]
    assert (first["step"], last["step"]) == (0, 300)
    assert last["eval/fvu"] < 0.5  # reconstructing every row by the mean gives FVU 1
    assert last["eval/fvu"] < 0.6 * first["eval/fvu"]
    assert last["eval/l0"] == pytest.approx(16)
    saved = json.loads((sae_run.out / "config.json").read_text())
    assert saved["hook"] == "blocks.2.hook_resid_pre" and saved["lr"] > 0  # resolved, not "auto"
    assert TrainConfig.from_dict(saved).n_features == 512  # config.json is a valid --config file


def test_batch_topk_keeps_k_per_token_at_inference(embedded_store, tmp_path):
    """After a short run the threshold (used at inference) keeps about k latents per held-out token."""
    res = run(cfg(embedded_store, tmp_path / "btk", activation="batchtopk", tokens=256 * 100))
    assert res.eval["eval/l0"] == pytest.approx(16, rel=0.15)
    sae = SparseAutoencoder.load(res.out / "sae")
    store = open_store(embedded_store)
    codes = sae.encode(store.rows(None, store.n_rows - N_EVAL, store.n_rows).float())
    assert (codes != 0).sum(-1).float().mean().item() == pytest.approx(res.eval["eval/l0"], rel=1e-4)


def test_saved_and_exported_sae_reconstruct_raw_activations(sae_run, embedded_store):
    import sae_lens

    from saekit.metrics import fvu

    store = open_store(embedded_store)
    x = store.rows(None, store.n_rows - N_EVAL, store.n_rows).float()  # the held-out rows
    sae = SparseAutoencoder.load(sae_run.out / "sae")
    assert float(sae.decoder.input_scale) != 1.0  # trained on normalized inputs...
    with torch.no_grad():
        ours = sae(x).reconstruction
    # ...yet the saved SAE takes raw activations, and its held-out FVU is the one logged.
    assert float(fvu(x, ours)) == pytest.approx(evals(sae_run.out)[-1]["eval/fvu"], rel=1e-3)
    sl = sae_lens.SAE.load_from_disk(str(sae_run.out / "sae_lens"))  # normalization folded in
    with torch.no_grad():
        theirs = sl(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3 * float(x.norm(dim=1).mean()))


@pytest.mark.slow
def test_mlp_encoder_beats_linear_on_the_same_frozen_dictionary(sae_run, embedded_store, tmp_path):
    common = dict(from_pretrained=str(sae_run.out), tokens=256 * 200)
    linear = run(cfg(embedded_store, tmp_path / "linear", **common))
    mlp = run(cfg(embedded_store, tmp_path / "mlp", d_hidden=256, **common))
    assert mlp.eval["eval/l0"] == linear.eval["eval/l0"] == pytest.approx(16)
    assert mlp.eval["eval/fvu"] < linear.eval["eval/fvu"] - 0.005
    frozen = SparseAutoencoder.load(sae_run.out / "sae").decoder.W_dec
    assert torch.equal(mlp.sae.decoder.W_dec, frozen) and torch.equal(linear.sae.decoder.W_dec, frozen)
    assert (tmp_path / "linear/sae_lens").is_dir() and not (tmp_path / "mlp/sae_lens").exists()


@pytest.mark.parametrize("init", [{"init_encoder": True}, {}], ids=["--init-encoder", "default"])
def test_init_encoder_starts_exactly_at_the_pretrained_sae(sae_run, embedded_store, tmp_path, init):
    # skip-connection init: pretrained linear path + an MLP path at zero = the pretrained SAE. It
    # is the default with --from-pretrained: bench/encoders.py's sweep measured it as the setting
    # that matters most for the MLP encoder (docs/encoders.md).
    run(cfg(embedded_store, tmp_path / "skip", from_pretrained=str(sae_run.out), d_hidden=64, tokens=256, **init))
    start = evals(tmp_path / "skip")[0]
    assert start["step"] == 0
    assert start["eval/fvu"] == pytest.approx(evals(sae_run.out)[-1]["eval/fvu"], rel=1e-5)
    assert read_run_config(tmp_path / "skip")["init_encoder"] is True


def test_no_init_encoder_starts_from_the_dictionarys_transpose(sae_run, embedded_store, tmp_path):
    run(cfg(embedded_store, tmp_path / "t", from_pretrained=str(sae_run.out), init_encoder=False, tokens=256))
    assert evals(tmp_path / "t")[0]["eval/fvu"] > evals(sae_run.out)[-1]["eval/fvu"] + 0.05
    assert read_run_config(tmp_path / "t")["init_encoder"] is False


@pytest.mark.slow
def test_dictionary_trained_on_mlp_and_pursuit_codes_improves(embedded_store, tmp_path):
    out = tmp_path / "dict"
    run(cfg(embedded_store, out, codes="both", d_hidden=128, tokens=256 * 150))
    first, last = evals(out)[0], evals(out)[-1]
    assert last["eval/pursuit_fvu"] < 0.8 * first["eval/pursuit_fvu"]
    assert last["eval/fvu"] < 0.8 * first["eval/fvu"]
    assert last["eval/pursuit_l0"] <= 16


# --- resume, two ranks ----------------------------------------------------------------------


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(embedded_store, tmp_path, monkeypatch):
    # k 4 of 512 latents and a 256-token dead window: AuxK is active, so its state must resume too.
    kw = dict(
        k=4,
        d_hidden=64,
        tokens=256 * 60,
        checkpoint_every=20,
        eval_every=25,
        log_every=5,
        dead_tokens=256,
        warmup_frac=0.1,
    )
    run(cfg(embedded_store, tmp_path / "full", **kw))
    assert any(m.get("train/auxk", 0) > 0 for m in read_metrics(tmp_path / "full"))  # AuxK state matters

    real, calls = saekit.train.stage.train_step, []

    def crash_at_step_31(*args, **kwargs):
        calls.append(1)
        if len(calls) == 31:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(saekit.train.stage, "train_step", crash_at_step_31)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(embedded_store, tmp_path / "cut", **kw))
    monkeypatch.setattr(saekit.train.stage, "train_step", real)
    assert json.loads((tmp_path / "cut/checkpoint/state.json").read_text())["position"]["step"] == 20

    with pytest.raises(SaekitError, match="already exists.*--resume"):
        run(cfg(embedded_store, tmp_path / "cut", **kw))
    run(cfg(embedded_store, tmp_path / "cut", resume=True, **kw))
    for f in (
        "sae/sae.safetensors",
        "checkpoint/optimizer.safetensors",
        "checkpoint/state.safetensors",
        "metrics.jsonl",
    ):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f

    with pytest.raises(SaekitError, match=r"different settings \(k: 4 -> 8\)"):
        run(cfg(embedded_store, tmp_path / "cut", resume=True, **(kw | {"k": 8})))


DDP_SCRIPT = """
import hashlib, json, os, sys
from saekit.train import TrainConfig
from saekit.train import run
res = run(TrainConfig(**json.loads(sys.argv[1])))
digest = hashlib.sha256(res.sae.decoder.W_dec.detach().numpy().tobytes()).hexdigest()
open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"]), "w").write(digest)
"""


@pytest.mark.slow
def test_two_ranks_follow_the_one_rank_loss_curve(embedded_store, tmp_path):
    kw = dict(n_features=256, tokens=256 * 100, log_every=1, dead_tokens=5000)
    run(cfg(embedded_store, tmp_path / "one", **kw))
    two = cfg(embedded_store, tmp_path / "two", **kw)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "ddp.py"),
        json.dumps(two.__dict__),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert json.loads((tmp_path / "two/run.json").read_text())["world_size"] == 2
    # DDP keeps the replicas identical: both ranks end with the same dictionary.
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text()
    curve = {
        r: torch.tensor([m["train/fvu"] for m in read_metrics(tmp_path / r) if "train/fvu" in m])
        for r in ("one", "two")
    }
    assert len(curve["one"]) == len(curve["two"]) == 100
    # Same global batch, different rows per step (each rank reads its own blocks): compare the
    # curves averaged over windows of 10 steps.
    one, two_ = curve["one"].view(10, 10).mean(1), curve["two"].view(10, 10).mean(1)
    assert torch.all((one - two_).abs() / one < 0.08), (one, two_)
    assert evals(tmp_path / "two")[-1]["eval/fvu"] == pytest.approx(evals(tmp_path / "one")[-1]["eval/fvu"], rel=0.05)


# --- errors: one line each ------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_another_ranks_write_probe_does_not_make_the_run_dir_taken(embedded_store, tmp_path):
    """Under torchrun every rank probes --out for writing at once; rank 0 must not see rank 1's
    probe file as an existing run (that race made the two-rank test flaky)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".saekit-write-test-99999").touch()  # rank 1's probe, caught in flight
    run(cfg(embedded_store, out, tokens=512, batch_size=256, eval_rows=1024))
    assert (out / "sae" / "sae.safetensors").is_file()


def test_incomplete_store_is_refused(tmp_path):
    w = create_store(tmp_path / "partial", {"h": 8}, n_rows=128, meta={}, shard_rows=64, chunk_rows=16)
    w.append({"h": torch.randn(128, 8)}, torch.zeros(128), torch.zeros(128))  # never finalized
    with pytest.raises(SaekitError, match="incomplete") as e:
        run(cfg(tmp_path / "partial", tmp_path / "run"))
    _one_line(e)


def test_missing_hook_is_named(embedded_store, tmp_path):
    with pytest.raises(SaekitError, match="no hook 'blocks.9.hook_resid_pre'.*blocks.2.hook_resid_pre") as e:
        run(cfg(embedded_store, tmp_path / "run", hook="blocks.9.hook_resid_pre"))
    _one_line(e)


def test_d_in_mismatch_is_refused(embedded_store, tmp_path):
    SparseAutoencoder(d_in=64, n_features=128, k=8).save(tmp_path / "small")
    with pytest.raises(SaekitError, match="d_in=64 but hook .* has d_model=128") as e:
        run(cfg(embedded_store, tmp_path / "run", from_pretrained=str(tmp_path / "small"), n_features=0))
    _one_line(e)


def test_k_above_n_features_is_refused(sae_run, embedded_store, tmp_path):
    with pytest.raises(SaekitError, match="--k 600 is larger than --n-features 512"):
        cfg(embedded_store, tmp_path / "run", k=600)
    with pytest.raises(SaekitError, match="--k 600 is larger than n_features 512"):
        run(cfg(embedded_store, tmp_path / "run", k=600, n_features=0, from_pretrained=str(sae_run.out)))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(embedded_store, tmp_path, monkeypatch):
    real, calls = saekit.train.loss.encode_decode, []

    def poisoned_at_step_13(sae, sae_in):
        calls.append(1)
        out = real(sae, sae_in)
        return out._replace(sae_out=out.sae_out * float("nan")) if len(calls) == 13 else out

    monkeypatch.setattr(saekit.train.loss, "encode_decode", poisoned_at_step_13)
    out = tmp_path / "run"
    with pytest.raises(SaekitError, match=r"loss became nan at step 13.*checkpoint \(step 10\)") as e:
        run(cfg(embedded_store, out, n_features=256, tokens=256 * 30, checkpoint_every=5))
    _one_line(e)
    assert json.loads((out / "checkpoint/state.json").read_text())["position"]["step"] == 10
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint/model.safetensors")).values())
    assert not (out / "sae").exists()


def test_wandb_gets_the_metrics_and_a_failing_wandb_is_one_line(embedded_store, tmp_path, monkeypatch):
    import types

    logged = []
    run_ = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run_))
    run(cfg(embedded_store, tmp_path / "ok", tokens=256 * 2, log_every=1, eval_every=2, wandb=True))
    assert [step for step, data in logged if "eval/fvu" in data] == [0, 2]
    assert [step for step, data in logged if "train/fvu" in data] == [1, 2]

    def refuse(**kw):
        raise RuntimeError("No API key configured.\nUse `wandb login`.")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    with pytest.raises(
        SaekitError, match="wandb.init failed .RuntimeError: No API key configured.*WANDB_MODE=offline"
    ) as e:
        run(cfg(embedded_store, tmp_path / "no", wandb=True))
    _one_line(e)
    assert not (tmp_path / "no").exists()  # nothing left that would need --resume


# --- pieces -------------------------------------------------------------------------------


def test_sparse_topk_decode_matches_the_dense_reference(monkeypatch):
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, n_features=64, k=4)
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True  # AuxK active too

    def loss_and_grads(dense: bool):
        monkeypatch.setattr(saekit.train.loss, "DENSE_DECODE", dense)
        sae.zero_grad()
        losses = saekit.train.loss.Objective(sae, "encoder", k=4, k_aux=8, auxk_coef=1 / 32, variance=16.0)(x, dead)
        losses.loss.backward()
        return losses, [p.grad.clone() for p in sae.parameters()]

    (a, grads_a), (b, grads_b) = loss_and_grads(False), loss_and_grads(True)
    assert a.auxk > 0
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.counts, b.counts)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)


def test_lr_warms_up_then_decays_to_zero():
    lrs = [saekit.train.stage.lr_at(s, 100, 1.0, warmup_frac=0.1, decay_frac=0.2) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == lrs[50] == 1.0
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and 0 < lrs[-1] <= 0.05


# --- CLI and config file ------------------------------------------------------------------


def _cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    from saekit.cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    return e.value.code or 0, capsys.readouterr().err


def test_cli_flags_override_the_config_file(embedded_store, tmp_path, capsys, monkeypatch):
    toml = tmp_path / "train.toml"
    toml.write_text(
        f'store = "{embedded_store}"\nn-features = 256\nk = 16\nbatch_size = 128\ntokens = 1280\n'
        f'eval_rows = {N_EVAL}\nprogress = false\ndevice = "cpu"\n'
    )
    code, err = _cli(capsys, monkeypatch, "train", "--config", toml, "--out", tmp_path / "run", "--k", 8)
    assert code == 0, err
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert (saved["k"], saved["n_features"], saved["batch_size"]) == (8, 256, 128)
    assert json.loads((tmp_path / "run/run.json").read_text())["steps"] == 10

    # --resume alone continues with the run's saved settings (here: nothing left to do).
    code, err = _cli(capsys, monkeypatch, "train", "--out", tmp_path / "run", "--resume")
    assert code == 0, err

    bad = tmp_path / "bad.toml"
    bad.write_text("kk = 3\n")
    code, err = _cli(capsys, monkeypatch, "train", "--config", bad, "--store", "x", "--out", tmp_path / "r2")
    assert (
        code == 1
        and err.strip() == f"error: --config {bad} has unknown key(s) kk; see `saekit train --help` for the names"
    )


def test_cli_train_help_lists_the_required_flags(capsys, monkeypatch):
    from typer.testing import CliRunner

    from saekit.cli.main import app

    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag in (
        "--store",
        "--hook",
        "--out",
        "--k",
        "--n-features",
        "--tokens",
        "--batch-size",
        "--lr",
        "--seed",
        "--resume",
        "--config",
        "--from-pretrained",
        "--d-hidden",
        "--n-hidden",
        "--codes",
        "--auxk-coef",
        "--k-aux",
    ):
        assert flag in res.output, flag


# --- config values are type-checked ---------------------------------------------------------


@pytest.mark.parametrize(
    "line, says",
    [
        ('normalize = "no"', "normalize must be true or false, got 'no'"),
        ('n-features = "lots"', "n-features must be an integer, got 'lots'"),
        ("k = [1, 2]", "k must be an integer, got [1, 2]"),
        ("tokens = true", "tokens must be an integer, got True"),
        ("batch_size = 1.5", "batch-size must be an integer, got 1.5"),
        ('lr = "fast"', "lr must be a finite number, got 'fast'"),
        ("hook = 3", "hook must be a string or null, got 3"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_one_line(tmp_path, capsys, monkeypatch, line, says):
    toml = tmp_path / "train.toml"
    toml.write_text(f'store = "somewhere"\n{line}\n')
    code, _, err = in_process(capsys, monkeypatch, "train", "--config", toml, "--out", tmp_path / "run")
    one_error(code, err, f"--config {toml}: {says}")
    assert not (tmp_path / "run").exists()


def test_config_values_of_the_right_type_are_taken_as_that_type(tmp_path):
    # JSON has null and writes 1e6 as a float; an int is a fine float.
    c = TrainConfig.from_dict({"store": "s", "out": "o", "hook": None, "tokens": 1e6, "lr": 1, "train_decoder": None})
    assert c.hook is None and c.train_decoder is None
    assert c.tokens == 1_000_000 and type(c.tokens) is int
    assert c.lr == 1.0 and type(c.lr) is float


# --- a damaged run on --resume: one line, nothing changed -----------------------------------


@pytest.fixture(scope="module")
def short_run(embedded_store, tmp_path_factory):
    """A finished 4-step run with a checkpoint, to damage copies of."""
    return run(
        cfg(
            embedded_store, tmp_path_factory.mktemp("short") / "run", n_features=256, tokens=256 * 4, checkpoint_every=2
        )
    )


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


DAMAGE = {
    "config is not JSON": ("config.json", lambda p: p.write_text(p.read_text()[:40]), "config.json is damaged"),
    "config has a wrong type": (
        "config.json",
        lambda p: _edit_json(p, lambda d: d.update(k="16")),
        "k must be an integer, got '16'",
    ),
    "config misses a key": (
        "config.json",
        lambda p: _edit_json(p, lambda d: d.pop("seed")),
        "config.json is damaged (no seed)",
    ),
    "state is not JSON": ("checkpoint/state.json", lambda p: p.write_text("{"), "checkpoint"),
    "state has a wrong type": (
        "checkpoint/state.json",
        lambda p: _edit_json(p, lambda d: d["position"].update(step="4")),
        "step must be an integer, got '4'",
    ),
    "state misses a key": (
        "checkpoint/state.json",
        lambda p: _edit_json(p, lambda d: d.pop("position")),
        "state.json: no position",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_on_resume_is_one_line_and_changes_nothing(short_run, tmp_path, capsys, monkeypatch, case):
    name, damage, says = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(short_run.out, out)
    damage(out / name)
    before = digest(out)
    code, _, err = in_process(capsys, monkeypatch, "train", "--out", out, "--resume", "--no-progress")
    one_error(code, err, says)
    assert digest(out) == before


# --- what the SAE learns from, and what it is measured by -------------------------------------


def _synthetic_store(path: Path, n: int, d: int = 16, seed: int = 0):
    """Rows: sparse nonnegative mixtures of 24 directions plus noise. Returns (writer, rows)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(24, d, generator=g)
    coef = torch.rand(n, 24, generator=g) * (torch.rand(n, 24, generator=g) < 0.2)
    x = coef @ atoms + 0.1 * torch.randn(n, d, generator=g) + 1.0
    return create_store(path, {"h": d}, n_rows=n, meta={"model": "synthetic"}, shard_rows=4096, chunk_rows=512), x


def test_normalization_comes_from_the_training_rows_only(tmp_path):
    w, x = _synthetic_store(tmp_path / "store", 6144)
    x[-2048:] += 50.0  # the held-out rows (the store's last) look nothing like the training rows
    w.append({"h": x}, torch.arange(6144), torch.zeros(6144))
    w.finalize()
    res = run(
        TrainConfig(
            store=str(tmp_path / "store"),
            out=str(tmp_path / "run"),
            n_features=64,
            k=4,
            batch_size=256,
            tokens=512,
            eval_rows=2048,
            device="cpu",
            progress=False,
        )
    )
    train_x = open_store(tmp_path / "store").rows(None, 0, 4096).double()
    torch.testing.assert_close(res.sae.decoder.input_mean.double(), train_x.mean(0), rtol=0, atol=1e-5)
    normalized = res.sae.decoder.normalize(train_x.float()).double()
    assert normalized.pow(2).sum(-1).mean().item() == pytest.approx(16, rel=1e-4)  # E||x_n||^2 = d_in


def test_eval_cossim_is_the_raw_space_cosine_similarity(sae_run, embedded_store):
    store = open_store(embedded_store)
    x = store.rows(None, store.n_rows - N_EVAL, store.n_rows).float()
    sae = SparseAutoencoder.load(sae_run.out / "sae")
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(x, sae(x).reconstruction, dim=-1).mean().item()
    assert evals(sae_run.out)[-1]["eval/cossim"] == pytest.approx(cos, rel=1e-5)


def test_calibration_rows_are_a_seeded_sample_spread_over_the_training_rows():
    rows = saekit.train.stage.calibration_rows(100_000, n_features=4096, seed=0)
    assert len(rows) == len(np.unique(rows)) == 2**24 // 4096
    assert rows.min() >= 0 and rows.max() < 100_000  # never a held-out row
    tenths = np.histogram(rows, bins=10, range=(0, 100_000))[0]
    assert tenths.min() > 0.8 * len(rows) / 10  # every tenth of the training rows is sampled
    assert np.array_equal(rows, saekit.train.stage.calibration_rows(100_000, n_features=4096, seed=0))
    assert not np.array_equal(rows, saekit.train.stage.calibration_rows(100_000, n_features=4096, seed=1))
    assert (
        len(saekit.train.stage.calibration_rows(300, n_features=4096, seed=0)) == 300
    )  # fewer rows than asked: all of them


def test_batch_topk_threshold_keeps_k_per_token_over_all_the_training_rows(tmp_path):
    # The first rows (say the first documents) are larger than the rest: a threshold fixed on
    # them lets far fewer than k latents fire on the other rows.
    w, x = _synthetic_store(tmp_path / "store", 20480)
    x[:4096] *= 4
    w.append({"h": x}, torch.arange(20480), torch.zeros(20480))
    w.finalize()
    res = run(
        TrainConfig(
            store=str(tmp_path / "store"),
            out=str(tmp_path / "run"),
            n_features=2048,
            k=8,
            activation="batchtopk",
            batch_size=256,
            tokens=256 * 40,
            eval_rows=2048,
            device="cpu",
            progress=False,
        )
    )
    with torch.no_grad():
        codes = res.sae.encode(open_store(tmp_path / "store").rows(None, 0, 20480 - 2048).float())
    assert (codes != 0).sum(-1).float().mean().item() == pytest.approx(8, rel=0.05)


# --- a full disk: one line, and --resume finishes with the bytes of an uninterrupted run ------

FULL = dict(
    n_features=256,
    k=16,
    batch_size=256,
    tokens=256 * 40,
    eval_rows=N_EVAL,
    eval_every=10,
    log_every=1,
    checkpoint_every=0,
    device="cpu",
)


def _train_args(store, out, **kw) -> list:
    flags = {"store": store, "out": out, **FULL, **kw}
    return ["train", *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", v)], "--no-progress"]


def _result(run_dir: Path) -> dict[str, str]:
    # config.json and run.json name the run dir and a random wandb id; everything else must match
    return {k: v for k, v in digest(run_dir).items() if k not in ("config.json", "run.json")}


@pytest.fixture(scope="module")
def full_run(embedded_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    run(TrainConfig(store=str(embedded_store), out=str(out), progress=False, **FULL))
    return out


@pytest.mark.parametrize("where", ["checkpoint", "metrics", "publish"])
def test_a_full_disk_is_one_line_and_resume_finishes_the_same_run(
    embedded_store, full_run, tmpfs, capsys, monkeypatch, where
):
    small = tmpfs_bytes(full_run / "config.json") + tmpfs_bytes(full_run / "run.json")
    ckpt, published = (
        tmpfs_bytes(full_run / "checkpoint"),
        tmpfs_bytes(full_run / "sae") + tmpfs_bytes(full_run / "sae_lens"),
    )
    size, flags = {
        "checkpoint": (
            small + tmpfs_bytes(full_run / "metrics.jsonl") + ckpt * 3 // 2,
            {"checkpoint_every": 20},
        ),  # no room for 2
        "metrics": (small + PAGE, {}),  # metrics.jsonl outgrows its first page
        "publish": (small + tmpfs_bytes(full_run / "metrics.jsonl") + ckpt + published // 2, {}),
    }[where]
    disk = tmpfs(size)
    out = disk / "run"
    code, _, err = in_process(capsys, monkeypatch, *_train_args(embedded_store, out, **flags))
    one_error(code, err, f"disk full while writing {out}", "--resume", "the last checkpoint is kept")
    state = out / "checkpoint" / "state.json"
    step = json.loads(state.read_text())["position"]["step"] if state.exists() else None
    assert step == {"checkpoint": 20, "metrics": None, "publish": 40}[where]
    assert not (out / "sae_lens").exists() and not (out / "checkpoint.tmp").exists()
    assert [m["step"] for m in read_metrics(out)] == sorted(m["step"] for m in read_metrics(out))  # no torn line

    tmpfs.remount(disk, 64 << 20)  # space freed
    code, _, err = in_process(capsys, monkeypatch, "train", "--out", out, "--resume")
    assert code == 0, err
    assert _result(out) == _result(full_run)


def test_an_unfinished_run_is_named_as_one_with_its_checkpoint_and_resume(
    embedded_store, tmp_path, capsys, monkeypatch
):
    """pursue (or eval, or anything that loads an SAE) given a run that was stopped before its end
    says that the run has not finished, the step of its last checkpoint and `--resume`; not that
    a weights file is missing."""
    from crash_points import stop_training_at_step

    real = saekit.train.stage.train_step
    stop_training_at_step(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(embedded_store, tmp_path / "cut", tokens=256 * 30, checkpoint_every=10))
    monkeypatch.setattr(saekit.train.stage, "train_step", real)
    args = ["pursue", "--store", embedded_store, "--sae", tmp_path / "cut", "--k", "4", "--out", tmp_path / "p"]
    code, _, err = in_process(capsys, monkeypatch, *args)
    one_error(code, err, "has not finished (its last checkpoint is step 10 of 30)", "--resume")
    with pytest.raises(SaekitError, match=r"has not finished .*--resume"):
        SparseAutoencoder.load(tmp_path / "cut")  # the raw loader, pointed at the run dir, says so too


def test_the_raw_loader_pointed_at_a_finished_run_names_its_sae_folder(sae_run):
    with pytest.raises(SaekitError, match=r"is a training run directory: load .*/sae \(load_sae takes"):
        SparseAutoencoder.load(sae_run.out)
    from saekit.sae import load_sae

    assert load_sae(sae_run.out).n_features == 512

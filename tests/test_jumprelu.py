"""JumpReLU training (`saekit train --activation jumprelu`): for the same weights and batch, the
loss and every gradient equal sae-lens's `JumpReLUTrainingSAE` under each of its three sparsity
losses; a default run starts at and keeps about --k active latents, exports to sae-lens and runs
through pursue; bad settings get one line."""

import json

import pytest
import torch
from cli_checks import in_process, one_error
from crash_points import stop_training_at_step

from saekit.sae import SparseAutoencoder
from saekit.train import run
from saekit.train.jumprelu import JumpReLUTraining, l0_coef_at
from saekit.train.loss import Objective
from saekit.train.stage import TrainConfig, read_metrics

D, N, B = 16, 48, 64


def _pair(mode: str, ste_to_input: bool, pre_act: float | None):
    """The same random weights and thresholds in sae-lens's JumpReLU training SAE and saekit's."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(N, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)  # saekit keeps unit-norm atoms
    W_enc, b_enc = torch.randn(D, N, generator=g) * 0.5, torch.randn(N, generator=g) * 0.1
    b_dec, threshold = torch.randn(D, generator=g) * 0.1, torch.rand(N, generator=g) * 0.8
    cfg = JumpReLUTrainingSAEConfig(
        d_in=D,
        d_sae=N,
        jumprelu_bandwidth=0.5,  # wide, so many pre-activations fall in the kernel and the test sees them
        jumprelu_sparsity_loss_mode=mode,
        jumprelu_ste_to_input=ste_to_input,
        pre_act_loss_coefficient=pre_act,
        target_l0=6.0 if mode == "quadratic" else None,
        dtype="float32",
    )
    theirs = JumpReLUTrainingSAE(cfg)
    mine = SparseAutoencoder(d_in=D, n_features=N, activation="jumprelu")
    with torch.no_grad():
        for m in (theirs, mine.encoder):
            m.W_enc.copy_(W_enc)
            m.b_enc.copy_(b_enc)
            m.threshold.copy_(threshold)
        for m in (theirs, mine.decoder):
            m.W_dec.copy_(W_dec)
            m.b_dec.copy_(b_dec)
    spec = JumpReLUTraining(mode, 0.5, 0.3, 6.0, 4.0, pre_act or 0.0, ste_to_input)
    return theirs, mine, spec


@pytest.mark.parametrize(
    "mode, ste, pre_act",
    [("step", False, None), ("tanh", True, 0.02), ("quadratic", False, None), ("quadratic", True, 0.02)],
    ids=["step-deepmind", "tanh-anthropic", "quadratic", "quadratic-ste-preact"],
)
def test_loss_and_gradients_equal_sae_lens_jumprelu(mode, ste, pre_act):
    from sae_lens.saes.sae import TrainStepInput

    theirs, mine, spec = _pair(mode, ste, pre_act)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(N) % 5 == 0
    out = theirs.training_forward_pass(
        TrainStepInput(
            sae_in=x, coefficients={"l0": 0.3}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
    )
    out.loss.backward()
    # variance 1: saekit's terms are then sae-lens's (summed over d, a mean over the batch)
    losses = Objective(mine, "encoder", 4, D // 2, 1 / 32, 1.0, jumprelu=spec)(x, dead, l0_coef=0.3)
    losses.loss.backward()
    torch.testing.assert_close(losses.loss, out.loss)
    torch.testing.assert_close(losses.fvu, out.losses["mse_loss"])
    assert float(losses.sparsity.detach()) > 0
    pairs = {
        "W_enc": (mine.encoder.W_enc, theirs.W_enc),
        "b_enc": (mine.encoder.b_enc, theirs.b_enc),
        "threshold": (mine.encoder.threshold, theirs.threshold),
        "W_dec": (mine.decoder.W_dec, theirs.W_dec),
        "b_dec": (mine.decoder.b_dec, theirs.b_dec),
    }
    for name, (a, b) in pairs.items():
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert float(mine.encoder.threshold.grad.abs().sum()) > 0  # the estimators reached the thresholds


def test_the_sparsity_weight_warms_up_as_sae_lens_schedules_it():
    from sae_lens.training.optim import CoefficientScheduler

    sched = CoefficientScheduler(warm_up_steps=4, final_value=2.0)
    for step in range(7):
        assert l0_coef_at(step, 2.0, 4) == pytest.approx(sched.step())


def cfg(store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        n_features=256,
        k=16,
        activation="jumprelu",
        batch_size=256,
        tokens=256 * 40,
        device="cpu",
        progress=False,
        checkpoint_every=0,
        eval_rows=2048,
    )
    return TrainConfig(**(base | kw))


def test_a_default_jumprelu_run_keeps_its_target_l0_exports_and_pursues(embedded_store, tmp_path):
    import sae_lens

    from saekit.pursue import PursueConfig
    from saekit.pursue import run as pursue

    res = run(cfg(embedded_store, tmp_path / "j"))
    evals = [m for m in read_metrics(res.out) if "eval/l0" in m]
    assert 12 < evals[0]["eval/l0"] < 21  # it starts at about --k (the thresholds are set so)
    assert 8 < evals[-1]["eval/l0"] < 24 and evals[-1]["eval/fvu"] < 0.8 * evals[0]["eval/fvu"]
    assert any(m.get("train/sparsity", 0) > 0 for m in read_metrics(res.out))
    sae = SparseAutoencoder.load(res.out / "sae")
    assert sae.activation == "jumprelu" and sae.k is None
    assert json.loads((res.out / "config.json").read_text())["sparsity_loss"] == ""  # the default, quadratic
    sl = sae_lens.SAE.load_from_disk(str(res.out / "sae_lens"))
    x = torch.randn(64, sae.d_in) * 3
    with torch.no_grad():
        torch.testing.assert_close(sl(x), sae(x).reconstruction, rtol=1e-3, atol=1e-3 * float(x.norm(dim=1).mean()))
    p = pursue(
        PursueConfig(
            store=str(embedded_store), sae=str(res.out), out=str(tmp_path / "p"), k=[16], methods=["gp"], progress=False
        )
    )
    by = {e.method: e for e in p.entries}
    assert by["gp"].fvu < 1 and "encoder" in by


def test_a_killed_jumprelu_run_resumes_bitwise(embedded_store, tmp_path, monkeypatch):
    """The thresholds are parameters (in the optimizer's state) and the sparsity weight warms up
    by step: both come back on --resume."""
    import saekit.train.stage

    kw = dict(tokens=256 * 30, checkpoint_every=10, l0_warmup_frac=0.5, sparsity_loss="tanh", pre_act_coef=1e-3)
    run(cfg(embedded_store, tmp_path / "full", **kw))
    real = saekit.train.stage.train_step
    stop_training_at_step(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(embedded_store, tmp_path / "cut", **kw))
    monkeypatch.setattr(saekit.train.stage, "train_step", real)
    run(cfg(embedded_store, tmp_path / "cut", resume=True, **kw))
    for f in ("sae/sae.safetensors", "checkpoint/optimizer.safetensors", "metrics.jsonl"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--activation", "jumprelu", "--bandwidth", "0"], "--bandwidth 0.0 must be > 0"),
        (["--activation", "jumprelu", "--sparsity-loss", "l1"], "use one of step, tanh, quadratic"),
        (["--sparsity-loss", "step"], "train a JumpReLU SAE: add --activation jumprelu"),
        (["--activation", "jumprelu", "--codes", "pursuit"], "drop --codes"),
    ],
)
def test_bad_jumprelu_settings_are_one_line(embedded_store, tmp_path, capsys, monkeypatch, flags, needle):
    args = ["train", "--store", embedded_store, "--out", tmp_path / "j", "--n-features", "256", *flags]
    code, _, err = in_process(capsys, monkeypatch, *args)
    one_error(code, err, needle)
    assert not (tmp_path / "j").exists()

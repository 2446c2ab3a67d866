"""Matryoshka Batch-TopK training (`saekit train --activation batchtopk --matryoshka 64,128,320`):
its loss and gradients are sae-lens's `matryoshka_batchtopk` training class's, it resumes exactly,
it exports as the JumpReLU SAE sae-lens saves it as, and bad group lists get one line."""

import json

import pytest
import torch
from cli_checks import in_process, one_error
from crash_points import stop_training_at_step

import saekit.train.stage
from saekit.errors import SaekitError
from saekit.sae import SparseAutoencoder
from saekit.train import run
from saekit.train.loss import Objective
from saekit.train.stage import TrainConfig

D, N, K, B = 16, 64, 4, 32
WIDTHS = [8, 24, 64]  # sae-lens's cumulative widths; saekit's groups are 8,16,40


def _pair():
    """The same random weights in a sae-lens Matryoshka training SAE and a saekit Batch-TopK SAE."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(N, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)  # saekit keeps unit-norm atoms
    W_enc = torch.randn(D, N, generator=g) * 0.3
    b_enc, b_dec = torch.randn(N, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D, d_sae=N, k=K, matryoshka_widths=list(WIDTHS), rescale_acts_by_decoder_norm=False, dtype="float32"
    )
    theirs = MatryoshkaBatchTopKTrainingSAE(cfg)
    mine = SparseAutoencoder(d_in=D, n_features=N, k=K, activation="batchtopk")
    with torch.no_grad():
        for m in (theirs, mine.encoder):
            m.W_enc.copy_(W_enc)
            m.b_enc.copy_(b_enc)
        for m in (theirs, mine.decoder):
            m.W_dec.copy_(W_dec)
            m.b_dec.copy_(b_dec)
    return theirs, mine


def test_loss_and_gradients_equal_sae_lens_matryoshka_batchtopk():
    from sae_lens.saes.sae import TrainStepInput

    theirs, mine = _pair()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1)) * 2
    no_dead = torch.zeros(N, dtype=torch.bool)
    out = theirs.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=no_dead, n_training_steps=0, is_logging_step=False)
    )
    out.loss.backward()
    # variance 1: saekit's FVU terms are then sae-lens's summed-over-d, mean-over-batch squared errors
    losses = Objective(mine, "encoder", K, D // 2, 1 / 32, 1.0, prefixes=(8, 24))(x, no_dead)
    losses.loss.backward()
    inner = sum(v for name, v in out.losses.items() if name.startswith("inner_mse_loss"))
    torch.testing.assert_close(losses.matryoshka, inner)
    torch.testing.assert_close(losses.loss, out.loss)
    pairs = [
        (mine.encoder.W_enc, theirs.W_enc),
        (mine.encoder.b_enc, theirs.b_enc),
        (mine.decoder.W_dec, theirs.W_dec),
        (mine.decoder.b_dec, theirs.b_dec),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    # and the inner prefixes matter: without them the loss is smaller, the gradients differ
    plain = Objective(_pair()[1], "encoder", K, D // 2, 1 / 32, 1.0)(x, no_dead)
    assert float(plain.loss.detach()) < float(losses.loss.detach()) - 1e-3


def cfg(store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        n_features=128,
        k=8,
        activation="batchtopk",
        matryoshka="16,48,64",
        batch_size=256,
        tokens=256 * 40,
        device="cpu",
        progress=False,
        checkpoint_every=10,
        eval_rows=2048,
    )
    return TrainConfig(**(base | kw))


def test_matryoshka_trains_resumes_exactly_and_exports_to_sae_lens(embedded_store, tmp_path, monkeypatch):
    import sae_lens

    full = run(cfg(embedded_store, tmp_path / "full"))
    logged = [m for m in saekit.train.stage.read_metrics(full.out) if "train/matryoshka" in m]
    assert logged and all(m["train/matryoshka"] > m["train/fvu"] > 0 for m in logged)  # two inner prefixes
    sae = SparseAutoencoder.load(full.out / "sae")
    assert sae.metadata["matryoshka_groups"] == [16, 48, 64]
    sl = sae_lens.SAE.load_from_disk(str(full.out / "sae_lens"))
    assert json.loads((full.out / "sae_lens" / "cfg.json").read_text())["architecture"] == "jumprelu"
    x = torch.randn(64, sae.d_in)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), sae(x).reconstruction, rtol=1e-3, atol=1e-3 * float(x.norm(dim=1).mean()))

    real = saekit.train.stage.train_step
    stop_training_at_step(monkeypatch, 15)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(embedded_store, tmp_path / "cut"))
    monkeypatch.setattr(saekit.train.stage, "train_step", real)
    run(cfg(embedded_store, tmp_path / "cut", resume=True))
    for f in ("sae/sae.safetensors", "checkpoint/optimizer.safetensors", "metrics.jsonl"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
    with pytest.raises(SaekitError, match="different settings"):
        run(cfg(embedded_store, tmp_path / "cut", resume=True, matryoshka="32,32,64"))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--matryoshka", "64,,320"], "positive whole numbers separated by commas"),
        (["--matryoshka", "64,0,448"], "positive whole numbers"),
        (["--matryoshka", "64,128,300"], "groups sum to 492, not n_features 512: make the last group 320"),
        (["--matryoshka", "64,128,320", "--activation", "topk"], "add --activation batchtopk"),
        (["--matryoshka", "64,128,320", "--codes", "pursuit"], "loss on the encoder's codes"),
    ],
)
def test_bad_matryoshka_groups_are_one_line(embedded_store, tmp_path, capsys, monkeypatch, flags, needle):
    if "--activation" not in flags:
        flags = [*flags, "--activation", "batchtopk"]
    args = ["train", "--store", embedded_store, "--out", tmp_path / "m", "--n-features", "512", "--k", "16", *flags]
    code, _, err = in_process(capsys, monkeypatch, *args)
    one_error(code, err, needle)
    assert not (tmp_path / "m").exists()


def test_groups_are_checked_against_a_size_known_only_from_the_store(embedded_store, tmp_path):
    with pytest.raises(SaekitError, match="sum to 96, not n_features 1024"):  # 8 x d_in 128
        run(cfg(embedded_store, tmp_path / "m", n_features=0, matryoshka="32,64"))
    assert not (tmp_path / "m" / "config.json").exists()

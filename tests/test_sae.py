"""SparseAutoencoder: sae-lens in and out, MLP encoders, Batch-TopK, normalization, save/load, errors."""

import json

import pytest
import sae_lens  # noqa: E402
import torch

from saekit.errors import SaekitError  # noqa: E402
from saekit.sae import Decoder, Encoder, SparseAutoencoder, topk_activation  # noqa: E402

D_IN, D_SAE, K = 32, 128, 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize_(sl, unit_rows: bool) -> None:
    """Random weights and biases (biases nonzero so the bias handling is exercised)."""
    with torch.no_grad():
        sl.W_enc.normal_(0, 0.3)
        sl.b_enc.normal_(0, 0.1)
        sl.W_dec.normal_(0, 0.3)
        sl.b_dec.normal_(0, 0.5)
        if unit_rows:
            sl.W_dec /= sl.W_dec.norm(dim=1, keepdim=True)


def make_sae_lens(arch: str):
    """A small sae-lens SAE of `arch` with random weights. Returns (sae, codes_identical)."""
    if arch == "standard":
        sl = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
        _randomize_(sl, unit_rows=False)
        return sl, False
    if arch == "topk":  # inference TopK, trained with a unit-norm decoder
        sl = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        _randomize_(sl, unit_rows=True)
        return sl, True
    if arch == "topk_rescaled":  # sae-lens TopK training: codes measured against row norms
        sl = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        _randomize_(sl, unit_rows=False)
        return sl, True
    if arch == "batchtopk":
        sl = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
        _randomize_(sl, unit_rows=False)
        sl.topk_threshold = torch.tensor(0.4, dtype=torch.double)
        return sl, True
    if arch == "jumprelu":
        sl = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
        _randomize_(sl, unit_rows=False)
        with torch.no_grad():
            sl.threshold.uniform_(0.0, 0.4)
        return sl, False
    raise AssertionError(arch)


def data(n: int = 64, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, D_IN) * 2 + shift


# ------------------------------------------------------------------------------------------
# Loading sae-lens SAEs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "topk_rescaled", "batchtopk", "jumprelu"])
def test_sae_lens_saved_model_loads_with_same_outputs(tmp_path, arch):
    sl, codes_identical = make_sae_lens(arch)
    sl.save_model(tmp_path / "sl")
    sae = SparseAutoencoder.from_pretrained(tmp_path / "sl")
    x = data()
    if arch == "batchtopk":
        sae.train()  # sae-lens's BatchTopK training SAE selects over the batch
    with torch.no_grad():
        ours, theirs = sae.encode(x), sl.encode(x)
        norms = sl.W_dec.norm(dim=1)
        expected = theirs if codes_identical else theirs * norms
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sae.decode(ours), sl.decode(theirs), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sae(x).reconstruction, sl(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.decoder.W_dec.norm(dim=1), torch.ones(D_SAE))
    assert sae.activation == {"standard": "relu", "topk_rescaled": "topk"}.get(arch, arch)


@pytest.mark.parametrize("matryoshka", [False, True])
@pytest.mark.parametrize("rescaled", [False, True])
def test_batchtopk_loaded_threshold_matches_sae_lens_inference_export(tmp_path, matryoshka, rescaled):
    """sae-lens saves a (Matryoshka) Batch-TopK SAE for inference as a JumpReLU SAE: saekit's
    encoder of the training SAE equals it, decoder rows of unequal norms or not."""
    kw = dict(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescaled)
    if matryoshka:
        cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[32, D_SAE], **kw)
        sl = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        sl = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**kw))
    _randomize_(sl, unit_rows=False)
    sl.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    sl.save_model(tmp_path / "train")
    sl.save_inference_model(tmp_path / "infer")  # sae-lens's own inference form: a JumpReLU SAE
    sae = SparseAutoencoder.from_pretrained(tmp_path / "train")
    assert not sae.training  # loaders return eval mode: the threshold is used
    jump = sae_lens.SAE.load_from_disk(tmp_path / "infer")
    x = data()
    with torch.no_grad():  # the same latents; codes in saekit's units (unit-norm atoms)
        ours, theirs = sae.encode(x), jump.encode(x)
        assert torch.equal(ours != 0, theirs != 0)
        torch.testing.assert_close(ours, theirs * jump.W_dec.norm(dim=1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sae(x).reconstruction, jump(x), atol=1e-5, rtol=1e-4)


def test_from_pretrained_finds_sae_id_subfolder_and_keeps_metadata(tmp_path):
    sl, _ = make_sae_lens("topk")
    sl.cfg.metadata.hook_name = "blocks.8.hook_resid_pre"
    sl.save_model(tmp_path / "release" / "blocks.8.hook_resid_pre")
    sae = SparseAutoencoder.from_pretrained(str(tmp_path / "release"), "blocks.8.hook_resid_pre", device="cpu")
    assert sae.metadata["hook_name"] == "blocks.8.hook_resid_pre"
    assert sae.k == K and sae.d_in == D_IN and sae.n_features == D_SAE


def test_k_replaces_native_activation_with_topk(tmp_path):
    sl, _ = make_sae_lens("standard")
    sl.save_model(tmp_path / "sl")
    relu = SparseAutoencoder.from_pretrained(tmp_path / "sl")
    topk = SparseAutoencoder.from_pretrained(tmp_path / "sl", k=5)
    x = data()
    with torch.no_grad():
        codes = topk.encode(x)
        assert (codes != 0).sum(dim=1).max() <= 5
        torch.testing.assert_close(codes, topk_activation(relu.encode(x), 5))


@pytest.mark.parametrize("rescaled", [False, True])
def test_topk_with_uneven_decoder_norms_encodes_as_sae_lens_does(tmp_path, rescaled):
    """A sae-lens TopK SAE whose decoder rows have unequal norms picks its k latents by its own
    pre-activations (or, with rescale_acts_by_decoder_norm, by pre-activation x row norm). saekit
    keeps unit-norm atoms, yet its encoder picks the same latents for every row and reconstructs
    what sae-lens does, through a save and load and an export back to sae-lens."""
    from saekit.encodings import encoder_codes

    cfg = sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescaled)
    sl = sae_lens.TopKSAE(cfg)
    _randomize_(sl, unit_rows=False)
    with torch.no_grad():
        sl.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)  # norms from 0.1 to 3 times the random ones
    sl.save_model(tmp_path / "sl")
    sae = SparseAutoencoder.from_pretrained(tmp_path / "sl")
    again = SparseAutoencoder.load(sae.save(tmp_path / "saekit"))
    x = data(512)
    with torch.no_grad():
        theirs = sl.encode(x)
        for mine in (sae, again):
            ours = mine.encode(x)
            assert torch.equal(ours != 0, theirs != 0)  # the same latents, every row
            torch.testing.assert_close(mine(x).reconstruction, sl(x), atol=1e-4, rtol=1e-4)
            c = encoder_codes(mine, x, K)
            assert torch.equal(c.indices.sort(-1).values, theirs.topk(K).indices.sort(-1).values)
        sae.export_sae_lens(tmp_path / "back")
        back = sae_lens.SAE.load_from_disk(tmp_path / "back")
        assert torch.equal(back.encode(x) != 0, theirs != 0)
        torch.testing.assert_close(back(x), sl(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Exporting to sae-lens
# ------------------------------------------------------------------------------------------


def _random_sae(activation: str, pre_bias: bool = True, **kw) -> SparseAutoencoder:
    k = K if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(D_IN, D_SAE, k, activation=activation, apply_preencoder_bias=pre_bias, **kw)
    with torch.no_grad():
        sae.encoder.W_enc.normal_(0, 0.3)
        sae.encoder.b_enc.normal_(0, 0.1)
        sae.decoder.b_dec.normal_(0, 0.5)
        if activation == "jumprelu":
            sae.encoder.threshold.uniform_(0, 0.3)
    return sae


@pytest.mark.parametrize(
    "activation,pre_bias",
    [("topk", True), ("topk", False), ("relu", True), ("relu", False), ("jumprelu", True), ("batchtopk", True)],
)
def test_export_round_trip_with_normalization_folded(tmp_path, activation, pre_bias):
    sae = _random_sae(activation, pre_bias)
    train = data(512, shift=3.0)
    sae.set_input_normalization(train.mean(0), train.pow(2).sum(1).mean().item())
    assert float(sae.decoder.input_scale) != 1 or bool(sae.decoder.input_mean.any())  # normalization is set
    if activation == "batchtopk":
        with torch.no_grad():
            for batch in train.split(64):
                sae.train()(batch)  # estimates the inference threshold
        sae.eval()
    sae.export_sae_lens(tmp_path / "out")
    sl = sae_lens.SAE.load_from_disk(tmp_path / "out")
    x = data(64, shift=3.0)  # raw activations: the exported SAE needs no normalization step
    with torch.no_grad():
        ours = sae.encode(x)
        assert (ours != 0).any()
        torch.testing.assert_close(sl.encode(x), ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sl.decode(ours), sae.decode(ours), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sl(x), sae(x).reconstruction, atol=1e-4, rtol=1e-4)


def test_export_of_mlp_encoder_says_it_is_saekit_only(tmp_path):
    sae = SparseAutoencoder(D_IN, D_SAE, K, d_hidden=16, n_hidden=1)
    with pytest.raises(SaekitError, match="MLP encoders exist only in saekit"):
        sae.export_sae_lens(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SaekitError, match="already exists"):
        _random_sae("topk").export_sae_lens(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------
# Encoder and decoder behaviour
# ------------------------------------------------------------------------------------------


def test_new_mlp_encoder_starts_equal_to_linear_encoder_and_learns(tmp_path):
    sl, _ = make_sae_lens("standard")
    sl.save_model(tmp_path / "sl")
    linear = SparseAutoencoder.from_pretrained(tmp_path / "sl", k=K)
    mlp = SparseAutoencoder.from_pretrained(tmp_path / "sl", k=K, d_hidden=64, n_hidden=2)
    x = data()
    with torch.no_grad():
        assert torch.equal(mlp.encode(x), linear.encode(x))
    out = mlp.train()(x)
    (out.sae_out - out.sae_in).pow(2).sum(-1).mean().backward()
    assert mlp.encoder.mlp[-1].weight.grad.abs().sum() > 0  # the zero-init path still trains

    # a new MLP encoder over an existing dictionary: its path adds exactly nothing at first, though
    # its hidden layers hold random weights (so it can learn), and it encodes as the linear one does
    fresh = SparseAutoencoder(decoder=linear.decoder, k=K, d_hidden=64, n_hidden=2)
    plain = SparseAutoencoder(decoder=linear.decoder, k=K)
    with torch.no_grad():
        assert fresh.encoder.mlp[0].weight.abs().sum() > 0
        assert torch.equal(fresh.encoder.mlp(x), torch.zeros(len(x), D_SAE))
        assert torch.equal(fresh.encoder.W_enc, linear.decoder.W_dec.T)
        assert torch.equal(fresh.encode(x), plain.encode(x))


def test_decoder_rows_stay_unit_norm_through_optimizer_steps():
    sae = SparseAutoencoder(D_IN, D_SAE, K)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = data(256)
    for _ in range(3):
        out = sae(x)
        (out.sae_out - out.sae_in).pow(2).sum(-1).mean().backward()
        sae.decoder.remove_parallel_grad_()
        parallel = (sae.decoder.W_dec.grad * sae.decoder.W_dec).sum(dim=1)
        torch.testing.assert_close(parallel, torch.zeros(D_SAE), atol=1e-6, rtol=0)
        opt.step()
        sae.decoder.normalize_rows_()
        opt.zero_grad()
        torch.testing.assert_close(sae.decoder.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_trainable_false_freezes_decoder_only():
    sae = SparseAutoencoder(D_IN, D_SAE, K)
    sae.decoder.trainable = False
    assert not sae.decoder.W_dec.requires_grad and not sae.decoder.b_dec.requires_grad
    before_dec, before_enc = sae.decoder.W_dec.clone(), sae.encoder.W_enc.clone()
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-2)
    out = sae(data())
    (out.sae_out - out.sae_in).pow(2).sum(-1).mean().backward()
    opt.step()
    assert torch.equal(sae.decoder.W_dec, before_dec)
    assert not torch.equal(sae.encoder.W_enc, before_enc)
    sae.decoder.trainable = True
    assert sae.decoder.trainable and sae.decoder.W_dec.requires_grad


def test_batchtopk_keeps_k_on_average_in_training_and_uses_threshold_at_eval():
    sae = _random_sae("batchtopk")
    x = data(64)
    assert sae.encoder.threshold.isnan().all()  # not estimated yet
    with torch.no_grad():
        sae.eval()
        fallback = sae.encode(x)  # a fresh SAE at eval selects over the batch
        assert (fallback != 0).sum() == K * 64
        sae.train()
        out = sae(x)
        per_token = (out.codes != 0).sum(dim=1)
        assert per_token.sum() == K * 64 and per_token.min() < per_token.max()
        first = sae.encoder.threshold.clone()
        torch.testing.assert_close(first, out.codes[out.codes > 0].min().expand(D_SAE))

        sae.eval()
        pre = sae(x).pre_acts
        codes = sae.encode(x)
        assert torch.equal(codes != 0, pre > sae.encoder.threshold)
        torch.testing.assert_close(sae.encode(x[:1]), codes[:1])  # a token's code no longer depends on its batch
        sae.encoder.threshold.fill_(1e9)
        assert not sae.encode(x).any()


def test_normalization_scales_inputs_and_pursuit_dictionary_matches_decode():
    mean = torch.randn(D_IN) * 5
    train = torch.randn(4096, D_IN) * 3 + mean
    sae = SparseAutoencoder(D_IN, D_SAE, K)
    sae.set_input_normalization(train.mean(0), train.pow(2).sum(1).mean().item())
    with torch.no_grad():
        out = sae(train)
        assert abs(out.sae_in.pow(2).sum(1).mean().item() / D_IN - 1) < 0.02
        assert abs(out.sae_in.mean(0)).max() < 0.05
        torch.testing.assert_close(out.reconstruction, sae.decoder.denormalize(out.sae_out))
        W, b = sae.decoder.raw_dictionary()
        torch.testing.assert_close(out.codes @ W + b, out.reconstruction, atol=1e-4, rtol=1e-4)


def test_encode_accepts_bf16_and_leading_dims():
    sae = SparseAutoencoder(D_IN, D_SAE, K)
    x = data(12).reshape(3, 4, D_IN)
    codes = sae.encode(x.bfloat16())
    assert codes.shape == (3, 4, D_SAE) and codes.dtype == torch.float32
    assert ((codes != 0).sum(-1) == K).all()


# ------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_everything(tmp_path):
    sae = _random_sae("batchtopk", d_hidden=16, n_hidden=2, metadata={"hook_name": "blocks.3.hook_resid_post"})
    train = data(256, shift=1.0)
    sae.set_input_normalization(train.mean(0), train.pow(2).sum(1).mean().item())
    with torch.no_grad():
        sae.encoder.mlp[-1].weight.normal_(0, 0.1)  # a trained-looking MLP path
        sae.train()(train)
    sae.eval()
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "sae.safetensors"]
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.config == sae.config
    x = data(32, shift=1.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))
        torch.testing.assert_close(loaded(x).reconstruction, sae(x).reconstruction)
    assert loaded.encoder.W_enc.requires_grad and loaded.decoder.W_dec.requires_grad


def test_load_is_lenient_about_config_keys(tmp_path):
    _random_sae("topk").save(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["from_the_future"] = 1
    del cfg["threshold_lr"], cfg["metadata"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.k == K and loaded.metadata == {}


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    sae = _random_sae("relu")
    sae.save(tmp_path / "sae")
    with pytest.raises(SaekitError, match="already exists"):
        sae.save(tmp_path / "sae")
    other = _random_sae("relu")
    other.save(tmp_path / "sae", overwrite=True)
    assert torch.equal(SparseAutoencoder.load(tmp_path / "sae").encoder.W_enc, other.encoder.W_enc)


# ------------------------------------------------------------------------------------------
# Errors: each is one SaekitError line
# ------------------------------------------------------------------------------------------


def _sae():
    return SparseAutoencoder(D_IN, D_SAE, K)


ERRORS = {
    "k zero": (lambda: SparseAutoencoder(D_IN, D_SAE, 0), "k 0 must be positive"),
    "k negative": (lambda: SparseAutoencoder(D_IN, D_SAE, -3), "k -3 must be positive"),
    "k too big": (lambda: SparseAutoencoder(D_IN, D_SAE, D_SAE + 1), "k 129 is larger than n_features 128"),
    "k fractional topk": (lambda: SparseAutoencoder(D_IN, D_SAE, 2.5), "whole number"),
    "k too big from decoder": (
        lambda: SparseAutoencoder(decoder=Decoder(D_SAE, D_IN), k=500),
        "k 500 is larger than n_features 128",
    ),
    "n_hidden without d_hidden": (lambda: SparseAutoencoder(D_IN, D_SAE, K, n_hidden=2), "needs d_hidden"),
    "encoder/decoder d_in": (
        lambda: SparseAutoencoder(encoder=Encoder(16, D_SAE, K), decoder=Decoder(D_SAE, D_IN)),
        "encoder d_in=16 does not match decoder d_in=32",
    ),
    "d_in vs decoder": (
        lambda: SparseAutoencoder(d_in=16, decoder=Decoder(D_SAE, D_IN), k=K),
        "d_in=16 does not match",
    ),
    "data width encode": (lambda: _sae().encode(torch.randn(4, 16)), "last dimension 16 but this SAE expects d_in=32"),
    "data width forward": (lambda: _sae()(torch.randn(4, 16)), "expects d_in=32"),
    "codes width decode": (lambda: _sae().decode(torch.randn(4, 100)), "expects n_features=128"),
    "no sizes": (lambda: SparseAutoencoder(), "give d_in and n_features"),
    "unknown activation": (lambda: SparseAutoencoder(D_IN, D_SAE, K, activation="gelu"), "unknown activation"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_are_one_clear_line(name):
    make, fragment = ERRORS[name]
    with pytest.raises(SaekitError, match=fragment) as info:
        make()
    assert "\n" not in str(info.value)


def test_unknown_release_and_id_say_how_to_list_them():
    with pytest.raises(SaekitError, match="get_pretrained_saes_directory") as info:
        SparseAutoencoder.from_pretrained("no-such-release-xyz", "blocks.0.hook_resid_pre")
    assert "unknown sae-lens release" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SaekitError, match="saes_map") as info:
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.99.no_such_hook")
    assert "unknown SAE id" in str(info.value) and "\n" not in str(info.value)


def _raise_offline(*args, **kwargs):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub.\nCheck your connection."
    )


def _raise_connection(*args, **kwargs):
    try:
        raise ConnectionError("[Errno -2] Name or service not known")
    except ConnectionError as e:
        raise RuntimeError("download failed\nretry later") from e


@pytest.mark.parametrize("failure", [_raise_offline, _raise_connection])
def test_network_failure_is_one_line(monkeypatch, failure):
    # The real hub call, with its network failure simulated (tests never touch the network).
    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", failure)
    with pytest.raises(SaekitError, match="could not download SAE gpt2-small-res-jb") as info:
        SparseAutoencoder.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert "\n" not in str(info.value)


def test_load_of_a_sae_lens_dir_points_to_from_pretrained(tmp_path):
    sl, _ = make_sae_lens("topk")
    sl.save_model(tmp_path / "sl")
    with pytest.raises(SaekitError, match="from_pretrained"):
        SparseAutoencoder.load(tmp_path / "sl")
    with pytest.raises(SaekitError, match="not a saved saekit SAE"):
        SparseAutoencoder.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------
# load_sae: one loader for every kind of SAE spec
# ------------------------------------------------------------------------------------------


def _saved(tmp_path):
    """(a training run dir holding sae/, the SAE saved there, a sae-lens dir of the same SAE)."""
    sae = _random_sae("topk")
    sae.set_input_normalization(torch.randn(D_IN), 4.0 * D_IN)
    sae.save(tmp_path / "run" / "sae")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"store": "s", "k": K}))  # the training config
    sae.export_sae_lens(tmp_path / "lens")
    return tmp_path / "run", sae, tmp_path / "lens"


def test_load_sae_takes_a_run_dir_a_saekit_dir_a_sae_lens_dir_and_home(tmp_path, monkeypatch):
    from saekit.sae import load_sae

    run, sae, lens = _saved(tmp_path)
    x = data(16)
    monkeypatch.setenv("HOME", str(tmp_path))
    for spec in (run, run / "sae", "~/run", str(lens), "~/lens"):
        loaded = load_sae(spec)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).reconstruction, sae(x).reconstruction, rtol=1e-4, atol=1e-4)


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def _set_json(path, **changes):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(cfg | changes))


# (what to break, fragment of the one-line error)
LOAD_ERRORS = {
    "no weights": (
        lambda run, lens: (run / "sae" / "sae.safetensors").unlink(),
        "no sae.safetensors: the weights file is missing",
    ),
    "truncated weights": (lambda run, lens: _truncate(run / "sae" / "sae.safetensors"), "sae.safetensors is damaged"),
    "weights of another size": (
        lambda run, lens: _set_json(run / "sae" / "config.json", n_features=2 * D_SAE),
        f"of shape [{D_IN}, {D_SAE}] but config.json says [{D_IN}, {2 * D_SAE}]",
    ),
    "config not JSON": (
        lambda run, lens: (run / "sae" / "config.json").write_bytes(b"\x89PNG\x00{"),
        "config.json is not valid JSON",
    ),
    "config not an object": (
        lambda run, lens: (run / "sae" / "config.json").write_text("[1, 2]"),
        "is not a saekit SAE config",
    ),
    "sae-lens d_in": (
        lambda run, lens: _set_json(lens / "cfg.json", d_in=16),
        f"cfg.json says d_in=16, d_sae={D_SAE} but its weights have W_dec [{D_SAE}, {D_IN}]",
    ),
    "sae-lens cfg not JSON": (lambda run, lens: (lens / "cfg.json").write_text("{oops"), "cfg.json is not valid JSON"),
    "sae-lens truncated weights": (
        lambda run, lens: _truncate(lens / "sae_weights.safetensors"),
        "sae_weights.safetensors is damaged",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_sae_errors_are_one_line(tmp_path, case):
    from saekit.sae import load_sae

    run, _, lens = _saved(tmp_path)
    breaks, fragment = LOAD_ERRORS[case]
    breaks(run, lens)
    spec = lens if case.startswith("sae-lens") else run
    with pytest.raises(SaekitError) as info:
        load_sae(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("{tmp}/nope", "no SAE directory at"),
        ("./nope", "no SAE directory at"),
        ("~/nope", "no SAE directory at"),
        ("{tmp}/run/sae/config.json", "is a file"),
        ("{tmp}/empty", "no SAE in"),
    ],
)
def test_load_sae_says_what_a_path_lacks(tmp_path, monkeypatch, spec, fragment):
    from saekit.sae import load_sae

    _saved(tmp_path)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SaekitError, match=fragment) as info:
        load_sae(spec.format(tmp=tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_cli_pursue_with_a_bad_sae_is_one_error_line(tmp_path, capsys, monkeypatch):
    """`saekit pursue --sae BAD`: exit 1 and one `error:` line, no traceback (the first case in a
    real subprocess, the rest through the same entry point in-process)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_cli_store import make_store

    from saekit.cli.main import main

    store = make_store(tmp_path / "store")
    run, _, lens = _saved(tmp_path)
    _truncate(run / "sae" / "sae.safetensors")
    _set_json(lens / "cfg.json", d_in=16)
    base = ["pursue", "--store", store, "--k", 2, "--out", tmp_path / "out"]
    p = subprocess.run(
        [sys.executable, "-m", "saekit.cli.main", *map(str, base), "--sae", run],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=False,
    )
    assert p.returncode == 1 and p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr
    assert "is damaged" in p.stderr
    for bad, fragment in ((lens, "cfg.json says d_in=16"), (tmp_path / "nope", "no SAE directory at")):
        monkeypatch.setattr(sys, "argv", ["saekit", *map(str, base), "--sae", str(bad)])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and fragment in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists()

"""The original sae-kit README's snippets, run as written (../shared/ORIGINAL-sae-kit-README.md).

Local artifacts stand in for hub downloads: a sae-lens SAE saved with sae-lens's own `save_model`
in a directory laid out like the hub release (`<release>/<sae_id>/cfg.json`), passed to
`from_pretrained` in place of the name "gpt2-small-res-jb"; the embedded model and corpus stand in
for gpt2-small and openwebtext (4 layers, so the hook is blocks.2 instead of blocks.8).
"""

import pytest
import torch

from sae_kit.sparse_autoencoder import SparseAutoencoder  # noqa: E402

HOOK = "blocks.8.hook_resid_pre"  # the SAE id used by the README's from_pretrained calls
MODEL_HOOK = "blocks.2.hook_resid_pre"  # the embedded model has 4 layers
D_IN, D_SAE = 128, 256  # the embedded model's d_model; d_sae >= 100 since the README asks for k=100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the README says "cuda"


@pytest.fixture
def release(tmp_path):
    """A standard (ReLU) sae-lens SAE, like gpt2-small-res-jb, saved where from_pretrained finds it."""
    import sae_lens

    torch.manual_seed(0)
    sl = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        sl.W_enc.normal_(0, 0.3)
        sl.W_dec.copy_(sl.W_enc.T / sl.W_enc.T.norm(dim=1, keepdim=True))
        sl.b_enc.normal_(0, 0.1)
    sl.cfg.metadata.hook_name = HOOK
    sl.save_model(tmp_path / "gpt2-small-res-jb" / HOOK)
    return str(tmp_path / "gpt2-small-res-jb")


@pytest.fixture(scope="module")
def data_generator(tmp_path_factory):
    """The README's 'Setting Up Data Generation', with the embedded model and corpus."""
    from datasets import load_dataset

    from sae_kit.utils import cached_activation_generator
    from saekit.embedded import CORPUS_PATH, load_embedded_model

    # Initialize model and dataset
    model = load_embedded_model(device="cpu", dtype=torch.bfloat16)  # gpt2-small on the hub
    assert model.cfg.d_model == D_IN
    dataset = load_dataset("json", data_files=str(CORPUS_PATH), split="train", streaming=True)  # openwebtext

    return cached_activation_generator(
        model,
        dataset,
        hook_name=MODEL_HOOK,
        skip_first_n_tokens=1,  # avoid training on BOS token
        activation_batch_size=512,  # below the 4096 default: keeps the pursuit in this test quick
        save_to_disk=str(tmp_path_factory.mktemp("acts")),  # keep the test's cache out of ./cache
    )


def activation_batches(n=128):
    torch.manual_seed(1)
    while True:
        yield torch.randn(n, D_IN, device=DEVICE)


def _loss(model, x):
    out = model(x)
    return (out.sae_out - out.sae_in).pow(2).sum(-1).mean()


def _train_a_little(model, data, steps=10):
    """The README's '... training loop': Adam on trainable parameters, unit-norm decoder rows.

    Returns the loss on a fixed held-out batch (before, after).
    """
    held_out = next(data)
    with torch.no_grad():
        before = _loss(model.eval(), held_out).item()
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        _loss(model, next(data)).backward()
        if model.decoder.trainable:
            model.decoder.remove_parallel_grad_()
        opt.step()
        opt.zero_grad()
        if model.decoder.trainable:
            model.decoder.normalize_rows_()
    with torch.no_grad():
        after = _loss(model.eval(), held_out).item()
    return before, after


def test_quick_start_loading(release):
    # Load a pretrained SAE
    sae = SparseAutoencoder.from_pretrained(
        release,  # Model release ("gpt2-small-res-jb" on the hub)
        "blocks.8.hook_resid_pre",  # Hook point
        device="cpu",
        k=100,  # Number of active features
    )
    assert sae.k == 100 and sae.d_in == D_IN and sae.n_features == D_SAE
    codes = sae.encode(torch.randn(8, D_IN))
    assert ((codes != 0).sum(dim=1) <= 100).all()


def test_workflow_1_gradient_pursuit(release, data_generator):
    from sae_kit.gradient_pursuit import gradient_pursuit
    from sae_kit.utils import compute_metrics

    sae = SparseAutoencoder.from_pretrained(release, "blocks.8.hook_resid_pre", device="cpu", k=100)

    # Get some activations
    activations = next(data_generator)

    # Run gradient pursuit
    gp_features = gradient_pursuit(
        activations,
        sae.decoder,
        k=67,  # Target sparsity
    )
    gp_reconstruction = sae.decode(gp_features)

    # Evaluate performance
    l0, fvu = compute_metrics(activations, gp_features, gp_reconstruction)
    print(f"L0: {l0}")
    print(f"FVU: {fvu}")  # should be better than using the pretrained encoder :)

    assert 0 < l0 <= 67
    with torch.no_grad():
        codes = sae.encode(activations)
        _, encoder_fvu = compute_metrics(activations, codes, sae.decode(codes))
    assert fvu < encoder_fvu


def test_workflow_2_example_1_mlp_on_pretrained(release):
    # Load pretrained SAE with MLP encoder
    mlp_sae = SparseAutoencoder.from_pretrained(
        release,
        "blocks.8.hook_resid_pre",
        device=DEVICE,
        k=100,
        d_hidden=1024,  # Size of hidden layers
        n_hidden=1,  # Number of hidden layers
    )
    # The encoder is initialized with skip connections from the original weights
    plain = SparseAutoencoder.from_pretrained(release, "blocks.8.hook_resid_pre", device=DEVICE, k=100)
    x = next(activation_batches())
    with torch.no_grad():
        assert torch.equal(mlp_sae.encode(x), plain.encode(x))

    # ... training loop
    before, after = _train_a_little(mlp_sae, activation_batches())
    assert after < before
    torch.testing.assert_close(mlp_sae.decoder.W_dec.norm(dim=1), torch.ones(D_SAE, device=DEVICE))


def test_workflow_2_example_2_new_mlp_encoder_frozen_decoder(release):
    # First load pretrained SAE for its dictionary
    pretrained_sae = SparseAutoencoder.from_pretrained(
        release,
        "blocks.8.hook_resid_pre",
        device=DEVICE,
        k=100,
    )

    # Create new SAE with MLP encoder and pretrained decoder
    new_sae = SparseAutoencoder(
        decoder=pretrained_sae.decoder,
        k=100,
        d_hidden=1024,
        n_hidden=2,
        device=DEVICE,
    )

    new_sae.decoder.trainable = False

    # ... training loop
    dictionary = new_sae.decoder.W_dec.detach().clone()
    before, after = _train_a_little(new_sae, activation_batches())
    assert after < before
    assert torch.equal(new_sae.decoder.W_dec, dictionary)  # the dictionary stayed frozen


def _normalized_saekit_sae():
    """A saekit SAE with input normalization set (as `saekit train --normalize`, the default, does),
    and activations that are nonnegative 8-sparse mixtures of its raw-space atoms."""
    from saekit.pursuit import SparseCodes, reconstruct

    torch.manual_seed(2)
    sae = SparseAutoencoder(d_in=D_IN, n_features=D_SAE, k=100)
    raw = torch.randn(4096, D_IN) * 3 + 5 * torch.randn(D_IN)  # offset and scale far from identity
    sae.set_input_normalization(raw.mean(0), raw.pow(2).sum(1).mean().item())
    W, b = sae.decoder.raw_dictionary()
    g = torch.Generator().manual_seed(3)
    idx = torch.rand(128, D_SAE, generator=g).argsort(dim=1)[:, :8]
    activations = reconstruct(SparseCodes(idx, 1 + 3 * torch.rand(128, 8, generator=g)), W, b)
    return sae, activations


def test_workflow_1_gradient_pursuit_on_a_normalized_saekit_sae():
    """The README's workflow 1 with a saekit-trained SAE: its decoder has input normalization, so the
    pursuit must work in raw activation space, where `sae.decode` returns its reconstruction."""
    from sae_kit.gradient_pursuit import gradient_pursuit
    from sae_kit.utils import compute_metrics
    from saekit.pursuit import reconstruct

    sae, activations = _normalized_saekit_sae()
    assert float(sae.decoder.input_scale) != 1 or bool(sae.decoder.input_mean.any())  # normalization is set
    gp_features = gradient_pursuit(activations, sae.decoder, k=67)
    gp_reconstruction = sae.decode(gp_features)
    l0, fvu = compute_metrics(activations, gp_features, gp_reconstruction)
    assert 0 < l0 <= 67
    assert fvu < 1e-3, fvu  # the activations are exact sparse mixtures of the atoms
    # the same codes as a pursuit against the raw-space dictionary
    W, b = sae.decoder.raw_dictionary()
    codes = gradient_pursuit(activations, W, 67, b_dec=b)
    torch.testing.assert_close(gp_reconstruction, reconstruct(codes, W, b), rtol=1e-4, atol=1e-4)


def test_normalize_activations_argument():
    """The original SparseAutoencoder(..., normalize_activations=False) still builds; True (the
    original's per-token rescaling inside forward) is one line naming what replaces it."""
    from saekit.errors import SaekitError

    sae = SparseAutoencoder(d_in=D_IN, n_features=D_SAE, k=8, normalize_activations=False)
    assert float(sae.decoder.input_scale) == 1 and not sae.decoder.input_mean.any()  # no normalization
    with pytest.raises(SaekitError) as err:
        SparseAutoencoder(d_in=D_IN, n_features=D_SAE, k=8, normalize_activations=True)
    msg = str(err.value)
    assert "\n" not in msg and "set_input_normalization" in msg and "saekit train --normalize" in msg

"""Amortised encoders that learn from pursuit: the unrolled encoder (`--unroll`), distillation
toward gradient pursuit's codes (`--distill`, on the fly or from a `saekit pursue` codes store),
and an encoder's cost per row (`encoder_cost`). Tiny shapes on the embedded default's cache."""

import json
from dataclasses import replace

import pytest
import torch
from cli_checks import in_process

import saekit.train.stage
from saekit.errors import SaekitError
from saekit.pursuit import gradient_pursuit
from saekit.sae import SAEConfig, SparseAutoencoder, encoder_cost, topk_activation
from saekit.store import open_store
from saekit.train import TrainConfig, batches, read_run_config, run
from saekit.train.checkpoint import Position
from saekit.train.stage import distill_targets

N_EVAL = 2048
K = 16


def cfg(store, out, **kw) -> TrainConfig:
    base = dict(
        store=str(store),
        out=str(out),
        k=K,
        batch_size=256,
        tokens=256 * 150,
        device="cpu",
        progress=False,
        checkpoint_every=0,
        eval_rows=N_EVAL,
    )
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def dictionary(embedded_store, tmp_path_factory):
    """A trained TopK SAE (128 -> 512 latents, k 16): the frozen dictionary the encoders learn over."""
    out = tmp_path_factory.mktemp("amortise") / "topk"
    return run(cfg(embedded_store, out, n_features=512, tokens=256 * 300, dead_tokens=20_000)).out


@pytest.fixture(scope="module")
def held_out(embedded_store) -> torch.Tensor:
    store = open_store(embedded_store)
    return store.rows(None, store.n_rows - N_EVAL, store.n_rows).float()


def gp_overlap(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    """|supp(encoder) ∩ supp(gp)| / k on rows x, gp at k against the SAE's dictionary."""
    with torch.no_grad():
        codes = sae.encode(x)
        gp = gradient_pursuit(sae.decoder.normalize(x), sae.decoder.W_dec, K, b_dec=sae.decoder.b_dec)
    support = torch.zeros_like(codes, dtype=torch.bool).scatter_(1, gp.indices, gp.values > 0)
    return float(((codes > 0) & support).sum(1).float().mean()) / K


# --- the unrolled encoder ---------------------------------------------------------------------


def test_no_steps_is_exactly_the_linear_encoder():
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=16, n_features=64, k=4, n_unroll=0)
    x = torch.randn(40, 16)
    by_hand = topk_activation((x - sae.decoder.b_dec) @ sae.encoder.W_enc + sae.encoder.b_enc, 4)
    assert torch.equal(sae.encode(x), by_hand)
    # older SAEs' state dicts: no refinement parameters are registered
    assert sorted(sae.encoder.state_dict()) == ["W_enc", "b_enc", "threshold"]
    # steps of size 0 and bias 0 leave the codes as the linear encoder made them
    unrolled = SparseAutoencoder(encoder=_unrolled_copy(sae, 2), decoder=sae.decoder)
    with torch.no_grad():
        unrolled.encoder.unroll_step_size.zero_()
    assert torch.equal(unrolled.encode(x), by_hand)
    with torch.no_grad():
        unrolled.encoder.unroll_step_size.fill_(1.0)
    assert not torch.equal(unrolled.encode(x), by_hand)  # a real step moves them


def _unrolled_copy(sae: SparseAutoencoder, steps: int):
    enc = SparseAutoencoder(decoder=sae.decoder, k=sae.k, n_unroll=steps).encoder
    with torch.no_grad():
        enc.W_enc.copy_(sae.encoder.W_enc)
        enc.b_enc.copy_(sae.encoder.b_enc)
    return enc


def test_unrolled_encoder_needs_the_dictionary_and_topk():
    enc = SparseAutoencoder(d_in=8, n_features=32, k=2, n_unroll=1).encoder
    with pytest.raises(SaekitError, match="pass W_dec, or use SparseAutoencoder.encode"):
        enc(torch.randn(3, 8))
    with pytest.raises(SaekitError, match="n_unroll=1 refines TopK codes"):
        SAEConfig(d_in=8, n_features=32, activation="batchtopk", k=2, n_unroll=1)


@pytest.mark.slow
def test_steps_lower_the_fvu_of_a_fresh_encoder_and_keep_k(dictionary, embedded_store, held_out, tmp_path):
    common = dict(from_pretrained=str(dictionary), tokens=256 * 100)
    plain = run(cfg(embedded_store, tmp_path / "t0", **common))
    unrolled = run(cfg(embedded_store, tmp_path / "t2", unroll=2, **common))
    assert unrolled.eval["eval/fvu"] < plain.eval["eval/fvu"] - 0.01
    for res, cost in ((plain, 1), (unrolled, 3)):  # the run says what its encoder costs per row
        assert json.loads((res.out / "run.json").read_text())["encoder_cost"] == cost
    with torch.no_grad():
        codes = unrolled.sae.encode(held_out)
    assert int((codes != 0).sum(1).max()) <= K and bool((codes >= 0).all())
    frozen = SparseAutoencoder.load(dictionary / "sae").decoder.W_dec
    assert torch.equal(unrolled.sae.decoder.W_dec, frozen)
    # end to end: the steps' own parameters moved from their initial values
    assert not torch.equal(
        unrolled.sae.encoder.unroll_step_size, torch.ones_like(unrolled.sae.encoder.unroll_step_size)
    )

    # saved and loaded (saekit format) it encodes the same; sae-lens has no such architecture
    loaded = SparseAutoencoder.load(unrolled.out / "sae")
    assert loaded.n_unroll == 2 and json.loads((unrolled.out / "sae/config.json").read_text())["n_unroll"] == 2
    with torch.no_grad():
        assert torch.equal(loaded.encode(held_out), codes)
    assert not (unrolled.out / "sae_lens").exists() and (plain.out / "sae_lens").is_dir()
    with pytest.raises(SaekitError, match=r"^unrolled encoders \(n_unroll > 0\) exist only in saekit"):
        loaded.export_sae_lens(tmp_path / "lens")


def test_encoder_cost_counts_linear_encoder_matmuls():
    assert encoder_cost(SparseAutoencoder(d_in=8, n_features=32, k=2)) == 1
    assert encoder_cost(SparseAutoencoder(d_in=8, n_features=32, k=2, n_unroll=3)) == 4
    # MLP 8 -> 16 -> 16 -> 32: 8*16 + 16*16 + 16*32 = 896 multiply-adds, 3.5 of 8*32
    mlp = SAEConfig(d_in=8, n_features=32, k=2, d_hidden=16, n_hidden=2, n_unroll=1)
    assert encoder_cost(mlp) == 1 + 3.5 + 1


# --- distillation -----------------------------------------------------------------------------


@pytest.mark.slow
def test_distillation_moves_the_support_toward_pursuit(dictionary, embedded_store, held_out, tmp_path):
    # From the dictionary's transpose: started from the trained encoder (the default), the rise
    # here is smaller (0.005), and docs/encoders.md measures what distillation does from there.
    common = dict(from_pretrained=str(dictionary), tokens=256 * 200, init_encoder=False)
    plain = run(cfg(embedded_store, tmp_path / "plain", **common))
    distilled = run(cfg(embedded_store, tmp_path / "distilled", distill=10.0, **common))
    assert gp_overlap(distilled.sae, held_out) > gp_overlap(plain.sae, held_out) + 0.01
    logged = [m["train/distill"] for m in saekit.train.stage.read_metrics(distilled.out) if "train/distill" in m]
    assert logged and logged[-1] < logged[0]  # the term is logged, and falls


def test_batches_carry_the_store_rows_of_their_activations(embedded_store):
    store = open_store(embedded_store)
    # 384-row batches: some span two shuffle windows (16 blocks of 1,024 rows), and the epoch's end
    start = Position(0, 0, 30)  # mid-epoch, as a resumed run starts
    it = batches(store, None, stop_row=store.n_rows - N_EVAL, local_batch=384, seed=0, start=start)
    try:
        for _ in range(60):  # past the first epoch's end (80 batches)
            b = next(it)
            assert b.rows.max() < store.n_rows - N_EVAL
            assert torch.equal(store.take(None, b.rows).view(torch.int16), b.x.view(torch.int16))
    finally:
        it.close()


@pytest.mark.slow
def test_distill_codes_from_pursue_match_pursuit_on_the_fly(
    dictionary, embedded_store, held_out, tmp_path, capsys, monkeypatch
):
    train_rows = open_store(embedded_store).n_rows - N_EVAL
    codes = tmp_path / "codes"
    argv = ["pursue", "--store", embedded_store, "--sae", dictionary, "--out", codes, "--method", "gp", "--k", K]
    code, _, err = in_process(capsys, monkeypatch, *argv, "--start-row", 0, "--rows", train_rows, "--device", "cpu")
    assert code == 0, err

    # the targets, looked up by the rows of a training batch, are pursuit's codes of those rows
    c = cfg(embedded_store, tmp_path / "x", from_pretrained=str(dictionary), distill=1.0, distill_codes=str(codes))
    store, sae = open_store(embedded_store), SparseAutoencoder.load(dictionary / "sae")
    c = saekit.train.stage.resolve(c, hook=store.resolve_hook(None), d_in=128, n_rows=store.n_rows, pretrained=sae)
    targets = distill_targets(c, store, c.hook, sae)
    b = next(batches(store, c.hook, stop_row=train_rows, local_batch=256, seed=0, start=Position()))
    stored = targets.take(b.rows)
    x_n = sae.decoder.normalize(b.x.float())
    fly = gradient_pursuit(x_n, sae.decoder.W_dec, K, b_dec=sae.decoder.b_dec)
    # raw space (pursue) and normalized space (training) differ only by float32 rounding
    same = (stored.indices.sort(1).values == fly.indices.sort(1).values).all(1).float().mean()
    assert same > 0.95
    torch.testing.assert_close(_dense(stored), _dense(fly), atol=0.05 * float(fly.values.max()), rtol=0)

    common = dict(from_pretrained=str(dictionary), tokens=256 * 100, distill=10.0)
    from_store = run(cfg(embedded_store, tmp_path / "stored", distill_codes=str(codes), **common))
    on_the_fly = run(cfg(embedded_store, tmp_path / "fly", **common))
    assert from_store.eval["eval/fvu"] == pytest.approx(on_the_fly.eval["eval/fvu"], rel=0.02)
    assert gp_overlap(from_store.sae, held_out) == pytest.approx(gp_overlap(on_the_fly.sae, held_out), abs=0.01)


def _dense(codes) -> torch.Tensor:
    return torch.zeros(codes.indices.shape[0], 512).scatter_add_(1, codes.indices, codes.values.float())


@pytest.mark.slow
def test_resume_of_an_unrolled_distilled_run_is_bitwise_identical(dictionary, embedded_store, tmp_path, monkeypatch):
    kw = dict(
        from_pretrained=str(dictionary),
        unroll=1,
        distill=1.0,
        d_hidden=32,
        tokens=256 * 40,
        checkpoint_every=10,
        eval_every=15,
        log_every=5,
    )
    run(cfg(embedded_store, tmp_path / "full", **kw))
    real, calls = saekit.train.stage.train_step, []

    def crash_at_step_21(*args, **kwargs):
        calls.append(1)
        if len(calls) == 21:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(saekit.train.stage, "train_step", crash_at_step_21)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(embedded_store, tmp_path / "cut", **kw))
    monkeypatch.setattr(saekit.train.stage, "train_step", real)
    # the loss is part of what a run is: resuming without the distillation term is refused
    with pytest.raises(SaekitError, match=r"different settings \(distill: 1.0 -> 0.0\)"):
        run(cfg(embedded_store, tmp_path / "cut", resume=True, **{**kw, "distill": 0.0}))
    run(cfg(embedded_store, tmp_path / "cut", resume=True, **kw))
    for f in ("sae/sae.safetensors", "checkpoint/optimizer.safetensors", "metrics.jsonl"):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f
    with pytest.raises(SaekitError, match=r"different settings \(unroll: 1 -> 2\)"):
        run(cfg(embedded_store, tmp_path / "cut", resume=True, **(kw | {"unroll": 2})))


def test_distill_codes_of_another_store_is_one_line(dictionary, embedded_store, tmp_path, capsys, monkeypatch):
    from saekit.harvest import HarvestConfig
    from saekit.harvest import run as harvest

    other = harvest(
        HarvestConfig(
            out=str(tmp_path / "other"), tokens=4096, shard_rows=2048, chunk_rows=1024, device="cpu", progress=False
        )
    ).path
    codes = tmp_path / "codes"
    argv = [
        "pursue",
        "--store",
        other,
        "--sae",
        dictionary,
        "--out",
        codes,
        "--method",
        "gp",
        "--k",
        K,
        "--device",
        "cpu",
    ]
    code, _, err = in_process(capsys, monkeypatch, *argv, "--start-row", 0, "--rows", 4096)
    assert code == 0, err
    c = cfg(embedded_store, tmp_path / "run", from_pretrained=str(dictionary), distill=1.0, distill_codes=str(codes))
    with pytest.raises(SaekitError, match=r"^--distill-codes \S+ come from another store or hook"):
        run(c)
    assert not (tmp_path / "run").exists()


def test_a_run_started_before_unroll_existed_still_resumes(dictionary, embedded_store, tmp_path):
    c = cfg(embedded_store, tmp_path / "old", from_pretrained=str(dictionary), tokens=256 * 4)
    run(c)
    config = tmp_path / "old/config.json"
    saved = json.loads(config.read_text())
    del saved["unroll"]  # as saekit wrote it before --unroll
    config.write_text(json.dumps(saved))
    assert run(replace(c, resume=True)).steps == 4


def test_a_run_started_before_init_encoder_became_the_default_still_resumes(dictionary, embedded_store, tmp_path):
    """Runs with --from-pretrained saved init_encoder false before it defaulted to true: the same
    command (init_encoder left unset) resumes them as they were, not refused as another run."""
    c = cfg(embedded_store, tmp_path / "old", from_pretrained=str(dictionary), tokens=256 * 4)
    run(replace(c, init_encoder=False))
    res = run(replace(c, resume=True))  # init_encoder unset, as the old command line had it
    assert res.steps == 4 and read_run_config(tmp_path / "old")["init_encoder"] is False

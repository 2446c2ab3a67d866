"""Synthetic stores (`saekit harvest --model synthetic:...`): sae-lens's SyntheticModel drawn into a
normal store that keeps the ground truth (each row's true code, the true features), reproducibly,
resumably, checked by verify and copied whole."""

import json

import pytest
import torch
from cli_checks import in_process, one_error

from saekit.errors import SaekitError
from saekit.harvest import HarvestConfig, run
from saekit.harvest.synthetic import SyntheticSource, synthetic_config, true_codes
from saekit.store import open_store
from saekit.store.copy import CopyConfig, copy_store
from saekit.store.format import TRUTH_FEATURES

TINY = {
    "num_features": 64,
    "hidden_dim": 16,
    "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.3, "min_prob": 0.02},
    "std_firing_magnitudes": 0.3,
    "seed": 3,
}
ROWS, SHARD = 1300, 512  # three shards, the last one partial


def _config(tmp_path, **change) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **change}))
    return f"synthetic:{path}"


def _harvest(model: str, out, **kw):
    return run(
        HarvestConfig(
            model=model, out=str(out), tokens=ROWS, shard_rows=SHARD, chunk_rows=128, device="cpu", progress=False, **kw
        )
    )


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    model = _config(tmp)
    _harvest(model, tmp / "store")
    return model, tmp / "store"


def test_the_store_keeps_the_generators_truth_for_every_row(tiny_store):
    model, out = tiny_store
    store = open_store(out)
    assert store.has_truth and store.n_rows == ROWS and store.hooks == ["hidden"]
    assert store.verify() == []
    source = SyntheticSource(synthetic_config(model))
    features = store.truth_features()
    assert torch.equal(features["features"], source.features) and torch.equal(features["bias"], source.bias)
    for i in range(3):  # each shard is the generator's draw for that shard, for the same seed
        lo, hi = i * SHARD, min(ROWS, (i + 1) * SHARD)
        x, feats = source.draw(i, hi - lo)
        want = true_codes(feats, store.layout.truth)
        indices, values = store.truth_codes(lo, hi)
        assert torch.equal(indices, want.indices.long()) and torch.equal(values, want.values)
        assert torch.equal(store.rows(None, lo, hi), x.to(torch.bfloat16))
    # the truth explains the rows (up to the bf16 rounding of the rows)
    indices, values = store.truth_codes(0, ROWS)
    x_true = (values[:, :, None] * features["features"][indices]).sum(1) + features["bias"]
    x = store.rows(None, 0, ROWS).float()
    assert ((x_true - x).norm(dim=1) / x.norm(dim=1)).max() < 0.01
    assert bool((store.tokens(0, ROWS) == -1).all())  # no token ids


def test_the_same_seed_gives_the_same_store_and_another_seed_another_draw(tiny_store, tmp_path):
    model, out = tiny_store
    again = _harvest(model, tmp_path / "again")
    assert again.content_hash == open_store(out).content_hash
    other = _harvest(model, tmp_path / "other", seed=4)
    assert other.content_hash != again.content_hash
    a, b = open_store(out).truth_features(), open_store(tmp_path / "other").truth_features()
    assert not torch.equal(a["features"], b["features"])


def test_a_resumed_harvest_ends_with_the_uninterrupted_bytes(tiny_store, tmp_path, monkeypatch):
    model, out = tiny_store
    real = SyntheticSource.draw

    def dies_at_shard_2(self, index, n):
        if index == 2:
            raise KeyboardInterrupt  # the deterministic kill point: after shards 0 and 1 are written
        return real(self, index, n)

    monkeypatch.setattr(SyntheticSource, "draw", dies_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        _harvest(model, tmp_path / "cut")
    monkeypatch.setattr(SyntheticSource, "draw", real)
    resumed = _harvest(model, tmp_path / "cut", resume=True)
    assert resumed.content_hash == open_store(out).content_hash


def test_verify_and_reads_find_damaged_truth(tiny_store, tmp_path):
    _, out = tiny_store
    copy = tmp_path / "copy"
    copy_store(CopyConfig(src=str(out), dst=str(copy), progress=False))  # the truth travels with the store
    assert open_store(copy).verify() == []
    assert torch.equal(open_store(copy).truth_features()["features"], open_store(out).truth_features()["features"])
    features = copy / TRUTH_FEATURES
    data = bytearray(features.read_bytes())
    data[-3] ^= 0xFF
    features.write_bytes(bytes(data))
    store = open_store(copy)
    assert any(p.startswith(f"{TRUTH_FEATURES}: damaged") for p in store.verify())
    with pytest.raises(SaekitError, match="true features .* are damaged"):
        store.truth_features()
    features.unlink()
    with pytest.raises(SaekitError, match="are missing"):
        open_store(copy).truth_features()
    # a true code flipped in a shard file: the shard's checksum says so
    shard = next((copy / "truth" / "values").rglob("c/*/*"))
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert any("truth/values" in p and "corrupt" in p for p in open_store(copy).verify())


def test_a_store_without_truth_says_so(embedded_store):
    store = open_store(embedded_store)
    assert not store.has_truth
    with pytest.raises(SaekitError, match="no ground truth .* --model synthetic:cpu"):
        store.truth_codes(0, 4)


@pytest.mark.parametrize(
    "model, needle",
    [
        ("synthetic:gpt2", "no synthetic preset 'gpt2'"),
        ("synthetic:/nonexistent/cfg.json", "no such file"),
        ("bad-json", "not readable JSON"),
        ("bad-field", "not a valid sae-lens SyntheticModelConfig"),
        ("bad-seed", "seed 'x' is not an integer"),
    ],
)
def test_bad_synthetic_models_are_one_line(model, needle, tmp_path, capsys, monkeypatch):
    if model == "bad-json":
        (tmp_path / "c.json").write_text("{ not json")
        model = f"synthetic:{tmp_path / 'c.json'}"
    elif model == "bad-field":
        model = _config(tmp_path, num_features=-3)
    elif model == "bad-seed":
        model = _config(tmp_path, seed="x")
    code, _, err = in_process(capsys, monkeypatch, "harvest", "--model", model, "--out", tmp_path / "out")
    one_error(code, err, needle)
    assert not (tmp_path / "out").exists()  # nothing written


def test_seed_is_only_for_synthetic_models(tmp_path, capsys, monkeypatch):
    code, _, err = in_process(capsys, monkeypatch, "harvest", "--seed", "3", "--out", tmp_path / "out")
    one_error(code, err, "--seed picks the draw of a synthetic model")


def _true_sae(store, out):
    """An SAE whose dictionary is the store's true features (and bias), saved as a saekit SAE."""
    from saekit.sae import SparseAutoencoder

    truth = open_store(store).truth_features()
    sae = SparseAutoencoder(d_in=TINY["hidden_dim"], n_features=TINY["num_features"], k=4)
    with torch.no_grad():
        sae.decoder.W_dec.copy_(truth["features"])
        sae.decoder.b_dec.copy_(truth["bias"])
        sae.encoder.W_enc.copy_(truth["features"].T)
    sae.save(out)
    return out


def test_pursue_reports_recovery_and_the_true_dictionary_scores_one(tiny_store, tmp_path):
    """On a store with ground truth, `saekit pursue` reports each encoding's recovery (held-out rows
    by default; here every row): an SAE holding the true dictionary gets MCC 1, and OMP at the
    most active features of any row finds most of each row's true features at their magnitudes.
    (Its precision is low here: 64 features in 16 dims with bf16 rows leave a residual that the
    spare slots fit; exact recovery on float rows is tests/test_recovery.py's.)"""
    from saekit.pursue import PursueConfig
    from saekit.pursue import run as pursue

    _, store = tiny_store
    sae = _true_sae(store, tmp_path / "true-sae")
    width = int((open_store(store).truth_codes(0, ROWS)[1] > 0).sum(1).max())
    res = pursue(
        PursueConfig(
            store=str(store),
            sae=str(sae),
            out=str(tmp_path / "p"),
            k=[width],
            methods=["omp", "gp"],
            start_row=0,
            batch_size=256,
            progress=False,
        )
    )
    by = {e.method: e for e in res.entries}
    assert set(by) == {"encoder", "omp", "gp"}
    for e in res.entries:
        assert (
            e.recovery is not None and e.recovery.mcc == pytest.approx(1.0, abs=1e-5) and e.recovery.matched_09 == 1.0
        )
    omp = by["omp"].recovery
    assert omp.recall > 0.8 and 0.9 < omp.shrinkage < 1.1, omp
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    keys = set().union(*(r["recovery"] for r in report))
    assert {"mcc", "precision", "recall", "f1"} <= keys
    md = (tmp_path / "p" / "report.md").read_text()
    assert "## Ground truth" in md and "ΔF1" in md and "| omp |" in md
    assert "## Ground truth" in res.table  # the printed table has it too


def test_an_activation_store_reports_no_recovery(embedded_store, tmp_path):
    """A store without ground truth: pursue's entries carry no recovery and its report no section."""
    from saekit.pursue import PursueConfig
    from saekit.pursue import run as pursue
    from saekit.sae import SparseAutoencoder

    sae = SparseAutoencoder(d_in=128, n_features=256, k=4)
    sae.save(tmp_path / "sae")
    res = pursue(
        PursueConfig(
            store=str(embedded_store),
            sae=str(tmp_path / "sae"),
            out=str(tmp_path / "p"),
            k=[4],
            methods=["gp"],
            rows=512,
            progress=False,
        )
    )
    assert all(e.recovery is None for e in res.entries) and "Ground truth" not in res.table


@pytest.mark.parametrize("command", ["eval", "dashboard", "pursue --downstream"])
def test_commands_that_need_token_ids_say_so_in_one_line(command, tiny_store, tmp_path, capsys, monkeypatch):
    _, store = tiny_store
    sae = _true_sae(store, tmp_path / "sae")
    args = [*command.split(), "--store", store, "--sae", sae, "--out", tmp_path / "out"]
    if command.startswith("pursue"):
        args += ["--k", "4", "--method", "gp"]
    code, _, err = in_process(capsys, monkeypatch, *args)
    one_error(code, err, "synthetic activations", "no token ids")

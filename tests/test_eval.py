"""`saekit eval` and `saekit.measure.downstream` on the embedded default's cache: splicing the clean
activations is exact, the ablations are what they say, the `start_at_layer` path equals a full
forward, SAELens's own evaluation code agrees, and every encoding is compared in one report."""

import json

import pytest
import torch
import torch.nn.functional as F
from cli_checks import in_process, one_error

from saekit.codes import open_codes
from saekit.errors import SaekitError
from saekit.eval import EvalConfig, downstream_series, run
from saekit.measure.downstream import CLEAN, ZERO, downstream_metrics, sequence_layout, sequence_tokens
from saekit.models import load_model
from saekit.sae import SparseAutoencoder
from saekit.store import open_store
from saekit.train import TrainConfig
from saekit.train import run as train

HOOK = "blocks.2.hook_resid_pre"
N_EVAL = 2048  # held-out rows of the training run: sequences 242..257 of 127 rows


@pytest.fixture(scope="module")
def sae_run(embedded_store, tmp_path_factory):
    """A TopK SAE (128 -> 512 latents, k 16), 300 steps of 256 rows: a few seconds."""
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = TrainConfig(
        store=str(embedded_store),
        out=str(out),
        n_features=512,
        k=16,
        batch_size=256,
        tokens=256 * 300,
        device="cpu",
        progress=False,
        checkpoint_every=0,
        eval_rows=N_EVAL,
        dead_tokens=20_000,
    )
    return train(cfg).out


@pytest.fixture(scope="module")
def model():
    return load_model(None, torch.device("cpu"), torch.float32).model


@pytest.fixture(scope="module")
def held_out(embedded_store):
    """(token ids [16, 128], cached rows [16, 127, 128]) of the held-out sequences."""
    store = open_store(embedded_store)
    layout = sequence_layout(store)
    seqs = range(-(-(store.n_rows - N_EVAL) // layout.per_seq), store.n_rows // layout.per_seq)
    rows = store.rows(HOOK, seqs.start * layout.per_seq, seqs.stop * layout.per_seq)
    return sequence_tokens(store, layout, seqs), rows.float().reshape(len(seqs), layout.per_seq, -1)


def _same(a, b, rel=1e-5):
    for f in a._fields:
        if f != "seconds":
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=rel, abs=1e-6, nan_ok=True), f


# --- the measurement ----------------------------------------------------------------------


@pytest.mark.parametrize("from_hook", [True, False])
def test_splicing_the_clean_activations_back_gives_exactly_clean_ce_and_zero_kl(model, held_out, from_hook):
    tokens, _ = held_out
    res = downstream_metrics(model, tokens[:6], HOOK, {"same": lambda x: x}, from_hook=from_hook)
    same, clean = res["same"], res[CLEAN]
    assert same.ce == clean.ce and same.delta_ce == 0.0
    assert same.kl_mean == same.kl_p90 == same.kl_p99 == 0.0
    assert same.fvu == 0.0 and same.n_tokens == 6 * 126  # positions 1..126 predict tokens 2..127


def test_zero_ablation_matches_a_hand_written_one(model, held_out):
    tokens, _ = held_out
    tokens = tokens[:4]

    def zero_after_bos(act, hook):
        act[:, 1:] = 0
        return act

    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, zero_after_bos)])
    # predictions from positions 1..126 of tokens 2..127
    ce = F.cross_entropy(ablated[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten()).item()
    kl = F.kl_div(ablated[:, 1:-1].log_softmax(-1), clean[:, 1:-1].log_softmax(-1), log_target=True, reduction="none")
    zero = downstream_metrics(model, tokens, HOOK, {})[ZERO]
    assert zero.ce == pytest.approx(ce, rel=1e-6)
    assert zero.kl_mean == pytest.approx(kl.sum(-1).mean().item(), rel=1e-5)
    assert zero.ce_recovered_zero == 0.0 and zero.fvu > 1  # zeros are worse than the mean


@pytest.mark.slow
def test_a_trained_sae_recovers_part_of_the_loss_and_start_at_layer_equals_a_full_forward(model, held_out, sae_run):
    tokens, acts = held_out
    sae = SparseAutoencoder.load(sae_run / "sae")
    mean = acts.flatten(0, 1).mean(0)
    fast = downstream_metrics(model, tokens, HOOK, {"sae": sae}, acts=acts, mean=mean)
    full = downstream_metrics(model, tokens, HOOK, {"sae": sae}, acts=acts, mean=mean, from_hook=False)
    for name in fast:
        _same(fast[name], full[name])
    m = fast["sae"]
    assert 0 < m.ce_recovered_zero < 1 and 0 < m.ce_recovered_mean < 1
    assert m.delta_ce > 0 and m.kl_mean > 0 and m.kl_p99 >= m.kl_p90 >= 0
    assert m.l0 == pytest.approx(16)


def test_clean_ce_spliced_ce_and_zero_ce_agree_with_sae_lens_own_evaluation(model, held_out, sae_run):
    """SAELens splices every position (BOS too) and counts every prediction: splice_from=0."""
    import sae_lens
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    tokens = held_out[0][:8]
    sl = sae_lens.SAE.load_from_disk(str(sae_run / "sae_lens"))  # exported by train, normalization folded in
    with torch.no_grad():
        theirs = get_recons_loss(
            sl, model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True, hook_name=HOOK
        )
    ours = downstream_metrics(model, tokens, HOOK, {"sae": SparseAutoencoder.load(sae_run / "sae")}, splice_from=0)
    assert abs(ours[CLEAN].ce - theirs["ce_loss_without_sae"].mean().item()) < 1e-3
    assert abs(ours["sae"].ce - theirs["ce_loss_with_sae"].mean().item()) < 1e-3
    assert abs(ours[ZERO].ce - theirs["ce_loss_with_ablation"].mean().item()) < 1e-3
    # the same KL direction; SAELens also averages the last position, which predicts nothing we count
    assert abs(ours["sae"].kl_mean - theirs["kl_div_with_sae"][:, :-1].mean().item()) < 1e-3


def test_activations_that_are_not_the_models_are_refused(model, held_out):
    tokens, acts = held_out
    with pytest.raises(SaekitError, match="differ from the cached ones by"):
        downstream_metrics(model, tokens[:4], HOOK, lambda x: x, acts=acts[1:5])  # one sequence off


# --- saekit eval on a store -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_encoder(sae_run, tmp_path_factory):
    """An MLP encoder over the SAE's dictionary whose MLP path is still zero: it encodes exactly
    as the SAE's own encoder, so its row must equal the encoder's."""
    sae = SparseAutoencoder.load(sae_run / "sae")
    mlp = SparseAutoencoder(decoder=sae.decoder, k=16, d_hidden=32, n_hidden=1, metadata=sae.metadata)
    with torch.no_grad():
        mlp.encoder.W_enc.copy_(sae.encoder.W_enc)
        mlp.encoder.b_enc.copy_(sae.encoder.b_enc)
    return mlp.save(tmp_path_factory.mktemp("mlp") / "mlp")


@pytest.fixture(scope="module")
def pursued(embedded_store, sae_run, tmp_path_factory):
    """`saekit pursue` gp at k 16 over its default rows: the run's 2048 held-out rows, codes from store row 30720 on."""
    from saekit.pursue import PursueConfig
    from saekit.pursue import run as pursue

    out = tmp_path_factory.mktemp("pursue") / "out"
    pursue(
        PursueConfig(
            store=str(embedded_store),
            sae=str(sae_run),
            out=str(out),
            k=[16],
            methods=["gp"],
            device="cpu",
            progress=False,
        )
    )
    return out


def test_eval_compares_every_encoding_on_the_held_out_sequences(
    embedded_store, sae_run, mlp_encoder, pursued, tmp_path
):
    res = run(
        EvalConfig(
            store=str(embedded_store),
            sae=str(sae_run),
            out=str(tmp_path / "a"),
            encoders=[str(mlp_encoder)],
            k=[4, 16],
            codes=str(pursued),
            device="cpu",
            progress=False,
        )
    )
    rows = {(e.method, e.k): e for e in res.entries}
    assert list(rows) == [
        ("clean", None),
        ("cache round-trip", None),
        ("zero ablation", None),
        ("mean ablation", None),
        ("encoder", 16),
        ("encoder:mlp", 16),
        ("gp", 4),
        ("gp", 16),
        ("mp", 4),
        ("mp", 16),
    ]
    assert res.header["rows"] == "30734..32765"  # the 16 whole sequences inside the run's 2048 held-out rows
    assert all(e.metrics.n_tokens == 16 * 126 for e in res.entries)
    _same(rows[("encoder:mlp", 16)].metrics, rows[("encoder", 16)].metrics, rel=1e-6)
    assert rows[("gp", 16)].source == f"{pursued}:gp_k16"  # read back, not recomputed
    assert rows[("gp", 4)].source == str(sae_run)  # not in the codes: computed here
    trip = rows[("cache round-trip", None)].metrics
    assert 0 <= abs(trip.delta_ce) < 1e-3 and trip.kl_mean < 1e-4  # bf16 rounding costs next to nothing
    enc = rows[("encoder", 16)].metrics
    assert 0 < enc.ce_recovered_zero < 1 and enc.l0 == pytest.approx(16)
    report = json.loads((res.out / "report.json").read_text())
    assert [e["method"] for e in report["entries"]] == [m for m, _ in rows]
    assert report["entries"][0]["fvu"] is None  # NaN is written as null
    assert "| encoder:mlp | 16 |" in (res.out / "report.md").read_text()
    assert (res.out / "delta_ce_vs_l0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the codes read back from `saekit pursue` give what computing them here gives
    again = run(
        EvalConfig(
            store=str(embedded_store),
            sae=str(sae_run),
            out=str(tmp_path / "b"),
            k=[16],
            methods=["gp"],
            device="cpu",
            progress=False,
        )
    )
    here = next(e for e in again.entries if e.method == "gp")
    assert here.source == str(sae_run)
    _same(here.metrics, rows[("gp", 16)].metrics, rel=1e-6)


def test_eval_marks_an_encoder_not_trained_with_its_dictionary_stale(embedded_store, sae_run, tmp_path):
    # the SAE's dictionary trained on, under pursuit codes: its encoder stays as it was
    cfg = TrainConfig(
        store=str(embedded_store),
        out=str(tmp_path / "dict"),
        from_pretrained=str(sae_run),
        codes="pursuit",
        k=16,
        batch_size=256,
        tokens=512,
        eval_rows=N_EVAL,
        checkpoint_every=0,
        device="cpu",
        progress=False,
    )
    dict_run = train(cfg).out
    res = run(
        EvalConfig(
            store=str(embedded_store),
            sae=str(dict_run),
            out=str(tmp_path / "e"),
            encoders=[str(sae_run)],
            sequences=1,
            device="cpu",
            progress=False,
        )
    )
    assert [e.method for e in res.entries][4:] == ["encoder (stale)", "encoder:run"]
    assert "`encoder (stale)`: not trained with its SAE's current dictionary" in (res.out / "report.md").read_text()


# --- saekit pursue --downstream: the same measurement, in pursue's report --------------------


@pytest.fixture(scope="module")
def short_store(tmp_path_factory):
    """The embedded default's first 2082 rows: 16 whole sequences of 127 rows and 50 rows of a 17th,
    in 5 shards. Every sequence is a few ms of the model per encoding: pursue and eval on all of it are fast."""
    from saekit.harvest import HarvestConfig
    from saekit.harvest import run as harvest

    out = tmp_path_factory.mktemp("short") / "store"
    cfg = HarvestConfig(
        out=str(out), tokens=16 * 127 + 50, shard_rows=512, chunk_rows=128, device="cpu", progress=False
    )
    return harvest(cfg).path


def _pursue(store, sae, out, **kw):
    from saekit.pursue import PursueConfig
    from saekit.pursue import run as pursue

    return pursue(PursueConfig(store=str(store), sae=str(sae), out=str(out), device="cpu", progress=False, **kw))


def _spliced(report: list[dict]) -> dict:
    """(method, k) -> the downstream metrics of each `saekit pursue` report entry, without their time."""
    return {(e["method"], e["k"]): {f: v for f, v in e["downstream"].items() if f != "seconds"} for e in report}


@pytest.mark.slow
def test_pursue_downstream_reports_what_eval_reports_and_a_resumed_run_the_same(
    short_store, sae_run, mlp_encoder, tmp_path, capsys, monkeypatch
):
    args = ["pursue", "--store", short_store, "--sae", sae_run, "--encoder", mlp_encoder, "--k", 16]
    args += ["--method", "gp", "--start-row", 0, "--device", "cpu", "--no-progress", "--downstream"]
    code, printed, err = in_process(capsys, monkeypatch, *args, "--out", tmp_path / "p")
    assert code == 0, err
    assert "| ΔCE | CE rec. (zero) | KL mean |" in printed and "| encoder:mlp | 16 |" in printed
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    ours = _spliced(report)
    assert list(ours) == [("encoder", 16), ("encoder:mlp", 16), ("gp", 16)]
    assert "downstream rows: `0..2031`" in (tmp_path / "p" / "report.md").read_text()  # the 16 whole sequences

    # saekit eval on the same sequences (the store's 16 whole ones) and the same codes reports the same
    code, _, err = in_process(
        capsys,
        monkeypatch,
        *["eval", "--store", short_store, "--sae", sae_run, "--encoder", mlp_encoder, "--codes", tmp_path / "p"],
        *["--sequences", 16, "--device", "cpu", "--no-progress", "--out", tmp_path / "e"],
    )
    assert code == 0, err
    theirs = json.loads((tmp_path / "e" / "report.json").read_text())["entries"]
    fields = set(next(iter(ours.values())))
    theirs = {(e["method"], e["k"]): {f: e[f] for f in fields} for e in theirs}
    assert all(ours[key] == theirs[key] for key in ours), (ours, theirs)
    assert ours[("gp", 16)]["n_tokens"] == 16 * 126 and 0 < ours[("gp", 16)]["ce_recovered_zero"] < 1

    # resumed: the codes of a run without --downstream, one shard's record gone as if it had been
    # killed before it; --resume --downstream recomputes that shard and reports the same
    resumed = _pursue(short_store, sae_run, tmp_path / "r", k=[16], methods=["gp"], start_row=0).out
    (resumed / "codes.zarr" / ".saekit-shards" / "gp_k16" / "shard-000001.json").unlink()
    code, _, err = in_process(capsys, monkeypatch, *args, "--out", resumed, "--resume")
    assert code == 0, err
    again = json.loads((resumed / "report.json").read_text())
    assert _spliced(again) == ours
    assert [e["fvu"] for e in again] == [e["fvu"] for e in report]


def test_pursue_downstream_takes_the_whole_sequences_inside_the_rows(
    short_store, sae_run, tmp_path, capsys, monkeypatch
):
    # rows 100..399: sequences 1 and 2 (127 rows each, rows 127..380) and parts of sequences 0 and 3;
    # the codes, from store row 100 on, are looked up at the sequences' rows
    part, whole = (
        _pursue(short_store, sae_run, tmp_path / str(r0), k=[8], start_row=r0, rows=n, downstream=True)
        for r0, n in ((100, 300), (127, 254))
    )
    assert part.header["downstream rows"] == whole.header["downstream rows"] == "127..380"
    for a, b in zip(part.entries, whole.entries):
        assert (a.n_rows, b.n_rows) == (300, 254) and a.fvu != b.fvu  # FVU on every row ...
        assert a.downstream._replace(seconds=0) == b.downstream._replace(seconds=0)  # ... CE and KL on whole sequences
        assert a.downstream.n_tokens == 2 * 126

    # fewer rows than one sequence: one line, and nothing written
    args = ["pursue", "--store", short_store, "--sae", sae_run, "--k", 8, "--start-row", 0, "--rows", 100]
    code, _, err = in_process(capsys, monkeypatch, *args, "--downstream", "--out", tmp_path / "few")
    one_error(
        code, err, "--downstream: the compared rows [0, 100) hold no whole sequence", "compare more rows (--rows)"
    )
    assert not (tmp_path / "few").exists()


def test_pursue_downstream_and_eval_read_codes_of_the_held_out_rows_alike(short_store, sae_run, tmp_path):
    # sae_run was trained on another store: the default rule holds out this one's last 208 rows
    # (1874..2081), whose one whole sequence is sequence 15 (rows 1905..2031)
    res = _pursue(short_store, sae_run, tmp_path / "p", k=[8], methods=["gp"], downstream=True)
    assert res.header["store rows"] == "1874..2081" and res.header["held out"].startswith("unknown")
    assert res.header["downstream rows"] == "1905..2031"
    assert open_codes(res.out).rows().tolist() == list(range(1874, 2082))
    # saekit eval's default takes the same sequence, and the same codes from --codes
    ev = run(
        EvalConfig(
            store=str(short_store),
            sae=str(sae_run),
            out=str(tmp_path / "e"),
            codes=str(res.out),
            device="cpu",
            progress=False,
        )
    )
    gp = next(e for e in ev.entries if e.method == "gp")
    assert gp.source == f"{res.out}:gp_k8" and ev.header["rows"] == "1905..2031"
    _same(gp.metrics, next(e for e in res.entries if e.method == "gp").downstream, rel=1e-6)


# --- the encoder's gap, decomposed in FVU, ΔCE and KL ------------------------------------------


def test_eval_decomposes_the_gap_and_reads_refit_and_encoder_gp_codes_back(short_store, sae_run, mlp_encoder, tmp_path):
    gap = dict(methods=["gp", "refit", "encoder+gp"], refine=2)
    p = _pursue(short_store, sae_run, tmp_path / "p", k=[8], start_row=0, downstream=True, **gap)
    pursued = p.out
    # pursue --downstream decomposes the gap in ΔCE and KL too
    assert [g.metric for g in p.gaps] == ["FVU", "ΔCE", "KL mean"]
    entry = {e.method: e for e in p.entries}
    assert p.gaps[1].refit == entry["refit"].downstream.delta_ce and p.gaps[2].gp == entry["gp"].downstream.kl_mean

    def evaluate(out, **kw):
        cfg = dict(store=str(short_store), sae=str(sae_run), sequences=2, device="cpu", progress=False)
        return run(EvalConfig(out=str(tmp_path / out), **gap, **cfg, **kw))

    res = evaluate("e", k=[8, 16], codes=str(pursued))
    rows = {(e.method, e.k): e for e in res.entries}
    assert list(rows)[4:] == [
        ("encoder", 16),
        ("encoder@k8", 8),  # the encoder (TopK k 16) at 8: what refit and encoder+gp at 8 start from
        ("gp", 8),
        ("gp", 16),
        ("refit", 8),
        ("refit", 16),
        ("encoder+gp", 8),
        ("encoder+gp", 16),
    ]
    assert rows["refit", 8].source == f"{pursued}:refit_k8" and rows["encoder+gp", 8].source == f"{pursued}:egp_k8"
    assert rows["refit", 16].source == str(sae_run)  # not in the codes: computed here
    for k, enc in ((8, rows["encoder@k8", 8]), (16, rows["encoder", 16])):
        assert rows["refit", k].metrics.fvu <= enc.metrics.fvu and rows["encoder+gp", k].metrics.fvu <= enc.metrics.fvu
    assert [(g.k, g.metric) for g in res.gaps] == [(k, m) for k in (8, 16) for m in ("FVU", "ΔCE", "KL mean")]
    for g in res.gaps:
        enc = rows["encoder@k8", 8] if g.k == 8 else rows["encoder", 16]
        field = {"FVU": "fvu", "ΔCE": "delta_ce", "KL mean": "kl_mean"}[g.metric]
        want = [getattr(r.metrics, field) for r in (enc, *(rows[m, g.k] for m in ("refit", "encoder+gp", "gp")))]
        assert [g.encoder, g.refit, g.encoder_gp, g.gp] == want
        assert g.coefficients == pytest.approx((g.encoder - g.refit) / (g.encoder - g.gp))
        assert g.coefficients + g.support == pytest.approx(1)
    report = json.loads((res.out / "report.json").read_text())
    assert report["gaps"] == [g.as_json() for g in res.gaps]
    md = (res.out / "report.md").read_text()
    assert "Gap decomposition" in md and "| 8 | ΔCE |" in md and "| 16 | KL mean |" in md and res.table in md

    # codes that started from another encoder (over the same dictionary) are refused
    with pytest.raises(SaekitError, match="started from another encoder than --sae"):
        run(EvalConfig(store=str(short_store), sae=str(mlp_encoder), out=str(tmp_path / "x"), codes=str(pursued)))

    # the plot draws refit and encoder+gp as curves over k, never also as an encoder's star
    curves, points, _ = downstream_series(res.entries)
    assert set(curves) == {"gp", "refit", "encoder+gp"} and set(points) == {"encoder", "encoder@k8"}

    # encoder+gp codes made with another --refine are refused, not mixed with rows computed at this one
    with pytest.raises(SaekitError, match=r"encoder\+gp made with --refine 2, but this run has --refine 3"):
        run(
            EvalConfig(
                out=str(tmp_path / "r"),
                **{**gap, "refine": 3},
                store=str(short_store),
                sae=str(sae_run),
                codes=str(pursued),
            )
        )

    # the codes pursue stored give what computing them here gives
    here = {(e.method, e.k): e for e in evaluate("h", k=[8]).entries}
    for m in ("refit", "encoder+gp"):
        assert here[m, 8].source == str(sae_run)
        _same(here[m, 8].metrics, rows[m, 8].metrics, rel=1e-5)

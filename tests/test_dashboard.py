"""`saekit dashboard` on the embedded model's cache: the streamed top-N contexts, density and max
equal a brute-force computation over dense codes; the pages are self-contained; `--codes` puts a
real `saekit pursue` output beside the encoder; the same inputs give the same bytes."""

import re
import shutil
import subprocess

import pytest
import torch
from cli_checks import in_process

from saekit.dashboard import DashboardConfig, run
from saekit.dashboard.stage import TopN, group_top_n
from saekit.encodings import encoder_codes
from saekit.pursue import PursueConfig
from saekit.pursue import run as pursue
from saekit.sae import SparseAutoencoder
from saekit.store import open_store

HOOK = "blocks.2.hook_resid_pre"
N_FEATURES, K, ROWS = 64, 4, 1024


@pytest.fixture(scope="module")
def sae_dir(embedded_store, tmp_path_factory):
    """An untrained TopK SAE (128 -> 64 latents, k 4) with the store's normalization."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=128, n_features=N_FEATURES, k=K)
    st = open_store(embedded_store).stats()
    sae.set_input_normalization(st.mean, st.mean_sq_norm)
    return sae.save(tmp_path_factory.mktemp("dash") / "sae")


@pytest.fixture(scope="module")
def codes_dir(embedded_store, sae_dir, tmp_path_factory):
    """A real `saekit pursue` output (gp at k 4) over the first ROWS held-out rows."""
    out = tmp_path_factory.mktemp("dash") / "pursue"
    cfg = PursueConfig(
        store=str(embedded_store), sae=str(sae_dir), out=str(out), k=[K], methods=["gp"], rows=ROWS, progress=False
    )
    return pursue(cfg).out


def _cfg(out, store, sae, **kw) -> DashboardConfig:
    base = dict(store=str(store), sae=str(sae), out=str(out), rows=ROWS, contexts=5, batch_size=300, progress=False)
    return DashboardConfig(**{**base, **kw})


def _brute_force(dense: torch.Tensor, n: int):
    """Per latent: (rows of its n largest nonzero values, those values), density, max."""
    out = []
    for i in range(dense.shape[1]):
        col = dense[:, i]
        nz = int((col > 0).sum())
        top = col.topk(min(n, nz))
        out.append((top.indices.tolist(), top.values.tolist(), nz / len(col), float(col.max())))
    return out


def _check_view(view, expected, first_row):
    rows, values, density, vmax = expected
    assert [c.value for c in view.top] == pytest.approx(values, rel=0, abs=0)
    assert {c.row - first_row for c in view.top} == set(rows)  # ties aside, the same rows
    assert view.density == pytest.approx(density)
    assert view.max == pytest.approx(vmax if rows else 0.0)


def test_top_contexts_density_and_max_equal_brute_force(embedded_store, sae_dir, tmp_path):
    res = run(_cfg(tmp_path / "site", embedded_store, sae_dir))
    store = open_store(embedded_store)
    first = store.n_rows - store.n_rows // 10  # the default held-out rule: an SAE not trained here
    x = store.rows(HOOK, first, first + ROWS).float()
    sae = SparseAutoencoder.load(sae_dir)
    c = encoder_codes(sae, x, K)
    dense = torch.zeros(ROWS, N_FEATURES).scatter_(1, c.indices, c.values)
    assert res.latents == list(range(N_FEATURES))
    for page, expected in zip(res.pages, _brute_force(dense, 5)):
        _check_view(page.views[0], expected, first)
        for ctx in page.views[0].top:  # the window's centre is the row, shaded with its value
            assert ctx.acts[ctx.centre] == pytest.approx(ctx.value)
            assert ctx.tokens[ctx.centre] == bytes([int(store.tokens(ctx.row, ctx.row + 1))]).decode(errors="replace")


@pytest.mark.parametrize("activation", ["batchtopk", "relu", "jumprelu"])
@pytest.mark.slow
def test_statistics_are_what_the_encoder_outputs_whatever_its_l0(embedded_store, tmp_path, activation):
    """Encoders without a fixed k per row (Batch-TopK at its inference threshold, ReLU, JumpReLU)
    give some rows more nonzeros than k or than any cap: every one of them counts (density, max,
    top contexts), as `sae.encode` outputs them."""
    torch.manual_seed(0)
    n = 256  # ReLU and JumpReLU: more than 64 nonzeros in a row
    sae = SparseAutoencoder(d_in=128, n_features=n, activation=activation, k=K if activation == "batchtopk" else None)
    store = open_store(embedded_store)
    st = store.stats()
    sae.set_input_normalization(st.mean, st.mean_sq_norm)
    first = store.n_rows - store.n_rows // 10
    x = store.rows(HOOK, first, first + ROWS).float()
    with torch.no_grad():
        if activation == "batchtopk":
            sae.calibrate_threshold_(x)  # k on average: many rows have more
        else:
            sae.encoder.b_enc.fill_(0.2)
            if activation == "jumprelu":
                sae.encoder.threshold.fill_(0.1)
    dense = sae.eval().encode(x).detach()
    per_row = (dense > 0).sum(1)
    assert int(per_row.max()) > (K if activation == "batchtopk" else 64)
    res = run(_cfg(tmp_path / "site", embedded_store, sae.save(tmp_path / "sae")))
    for page, expected in zip(res.pages, _brute_force(dense, 5)):
        _check_view(page.views[0], expected, first)
        for ctx in page.views[0].top:
            assert ctx.acts[ctx.centre] == pytest.approx(ctx.value)


def test_group_top_n_keeps_the_n_highest_of_each_group():
    g = torch.tensor([0, 1, 0, 0, 1, 2])
    p = torch.tensor([0.5, 0.2, 0.9, 0.1, 0.7, 0.3], dtype=torch.float64)
    kept, rank = group_top_n(g, p, 2)
    got = sorted(zip(g[kept].tolist(), rank.tolist(), kept.tolist()))
    assert got == [(0, 0, 2), (0, 1, 0), (1, 0, 4), (1, 1, 1), (2, 0, 5)]


def test_top_n_merging_pending_entries_many_times_keeps_the_n_best():
    g = torch.Generator().manual_seed(0)
    latent, value = torch.randint(0, 7, (500,), generator=g), torch.rand(500, generator=g)
    top = TopN(7, 3, pending=0)
    top.cap = 10  # merge every few offers
    for s in range(0, 500, 37):
        sl = slice(s, s + 37)
        top.add_(latent[sl], torch.arange(500)[sl], value[sl], value[sl].double())
    top.merge_()
    for i in range(7):
        want = value[latent == i].topk(3)
        assert top.values[i].tolist() == want.values.tolist()
        assert top.rows[i].tolist() == torch.nonzero(latent == i).flatten()[want.indices].tolist()


def test_pages_are_self_contained_and_reproducible(embedded_store, sae_dir, tmp_path):
    a = run(_cfg(tmp_path / "a", embedded_store, sae_dir, random=6, seed=3)).out
    b = run(_cfg(tmp_path / "b", embedded_store, sae_dir, random=6, seed=3)).out
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == 7 and "index.html" in files
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        text = (a / name).read_text()
        assert not re.search(r"https?://", text), name
        assert text == (b / name).read_text(), name
        assert all(h.startswith("latent_") or h == "index.html" for h in re.findall(r'href="([^"]*)"', text))


def test_side_by_side_with_pursue_codes(embedded_store, sae_dir, codes_dir, tmp_path):
    res = run(_cfg(tmp_path / "site", embedded_store, sae_dir, codes=str(codes_dir), latents="1,7,30"))
    store = open_store(embedded_store)
    first = store.n_rows - store.n_rows // 10
    from saekit.codes import open_codes

    c = open_codes(codes_dir).codes(f"gp_k{K}", 0, ROWS)
    dense = torch.zeros(ROWS, N_FEATURES).scatter_(1, c.indices, c.values)
    expected = _brute_force(dense, 5)
    for page in res.pages:
        assert [v.name for v in page.views] == ["encoder", f"gp_k{K}"]
        _check_view(page.views[1], expected[page.latent], first)
        enc, gp = ({ctx.row for ctx in v.top} for v in page.views)
        assert page.overlap == len(enc & gp) / len(enc)
        html = (res.out / f"latent_{page.latent}.html").read_text()
        assert 'data-encoding="encoder"' in html and f'data-encoding="gp_k{K}"' in html
    index = (res.out / "index.html").read_text()
    assert "top-context overlap" in index and f"density (gp_k{K})" in index


def test_without_the_model_token_ids_are_shown_with_a_note(embedded_store, sae_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "site"
    args = ["dashboard", "--store", embedded_store, "--sae", sae_dir, "--out", out, "--rows", 256]
    code, stdout, err = in_process(
        capsys, monkeypatch, *args, "--latents", "3", "--model", tmp_path / "gone", "--no-progress"
    )
    assert code == 0, err
    assert "note: the model could not be loaded" in stdout and f"index: {out / 'index.html'}" in stdout
    page = (out / "latent_3.html").read_text()
    assert "logit effects are omitted" in page and re.search(r">id \d+</span>", page)


def _dom(url: str) -> str:
    """The DOM of `url` after Debian's chromium, headless, has loaded it and run its scripts."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_page_renders_in_headless_chromium(embedded_store, sae_dir, codes_dir, tmp_path):
    res = run(_cfg(tmp_path / "site", embedded_store, sae_dir, codes=str(codes_dir), top=8))
    p = max(res.pages, key=lambda p: p.views[0].density)
    dom = _dom((res.out / f"latent_{p.latent}.html").as_uri())
    assert f"<h1>latent {p.latent}</h1>" in dom
    cols = re.findall(r'<div class="col" data-encoding="([^"]+)"', dom)
    assert cols == ["encoder", f"gp_k{K}"]  # the side-by-side columns
    for view in p.views:  # each top context, its max token shaded and its value on hover
        for c in view.top:
            assert f'data-row="{c.row}"' in dom
            assert f'<span class="tok max" data-act="{c.value:.4g}" title="{c.value:.4g}" style="background:' in dom
    # the index's inline script runs: #sort=6 sorts by the top-context overlap, most disagreement first
    index = _dom((res.out / "index.html").as_uri() + "#sort=6")
    order = [int(i) for i in re.findall(r'<a href="latent_(\d+).html">', index)]
    assert sorted(order) == res.latents
    assert order == [q.latent for q in sorted(res.pages, key=lambda q: q.overlap)]

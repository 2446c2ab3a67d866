"""A shared cache root: a harvest finds its store by identity instead of recomputing it, serves a
smaller request from a bigger store, and extends a smaller one in place (local and on S3)."""

import pytest
import torch

import saekit.harvest
from saekit.harvest import HarvestConfig, run
from saekit.store import list_stores, open_store

SMALL = dict(shard_rows=1024, chunk_rows=256, device="cpu", progress=False)
HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


@pytest.fixture
def forwards(monkeypatch):
    """Counts forward passes of the model (the work a cache root exists to save)."""
    calls = []
    real = saekit.harvest.forward_acts
    monkeypatch.setattr(saekit.harvest, "forward_acts", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_second_harvest_of_the_same_identity_returns_the_existing_store(tmp_path, monkeypatch, forwards):
    monkeypatch.setenv("SAEKIT_CACHE", str(tmp_path / "shared"))
    first = run(HarvestConfig(tokens=3000, **SMALL))
    assert forwards and str(first.path).startswith(str(tmp_path / "shared" / "saekit-embedded" / "embedded-"))
    forwards.clear()
    again = run(HarvestConfig(tokens=3000, **SMALL))
    assert forwards == [] and again == first._replace(tokens_per_s=0.0)
    # fewer rows, other shard sizes: the same rows, so the same store serves it
    assert (
        run(HarvestConfig(tokens=1000, shard_rows=512, chunk_rows=128, device="cpu", progress=False)).path == first.path
    )
    assert forwards == []
    # another identity (context length) is another store
    other = run(HarvestConfig(tokens=1000, ctx_len=64, **SMALL))
    assert forwards and other.path != first.path and open_store(other.path).meta["ctx_len"] == 64


def test_a_superset_store_serves_fewer_hooks_and_a_smaller_one_is_extended(tmp_path, forwards):
    root = str(tmp_path / "root")
    both = run(HarvestConfig(hooks=HOOKS, tokens=3000, cache_root=root, **SMALL))
    forwards.clear()
    one = run(HarvestConfig(hooks=HOOKS[1:], tokens=2000, cache_root=root, **SMALL))
    assert forwards == [] and one.path == both.path
    reader = open_store(both.path)  # opened before the extension: its rows stay readable
    before = reader.rows(HOOKS[0], 0, 3000).clone()
    grown = run(HarvestConfig(hooks=HOOKS[1:], tokens=6000, cache_root=root, **SMALL))
    assert grown.path == both.path and grown.n_rows == 6000
    extending, forwards[:] = len(forwards), []
    fresh = run(HarvestConfig(hooks=HOOKS, tokens=6000, out=str(tmp_path / "fresh"), **SMALL))
    # only the new rows were computed: the old last (partial) shard from row 2048, and the new ones
    assert 0 < extending <= len(forwards) * 4500 / 6000
    assert grown.content_hash == fresh.content_hash  # the same store as one harvested at that size
    assert torch.equal(reader.rows(HOOKS[0], 0, 3000).view(torch.int16), before.view(torch.int16))
    assert open_store(grown.path).verify() == []


def test_remote_cache_root_reuses_and_extends(s3_bucket, tmp_path, forwards, monkeypatch, capsys):
    root = f"{s3_bucket}/team-cache"
    first = run(HarvestConfig(tokens=3000, cache_root=root, staging=str(tmp_path / "st"), **SMALL))
    assert str(first.path).startswith(root + "/saekit-embedded/embedded-")
    forwards.clear()
    again = run(HarvestConfig(tokens=3000, cache_root=root, staging=str(tmp_path / "st"), **SMALL))
    assert forwards == [] and again.path == first.path and again.content_hash == first.content_hash
    grown = run(HarvestConfig(tokens=5000, cache_root=root, staging=str(tmp_path / "st"), **SMALL))
    fresh = run(HarvestConfig(tokens=5000, out=str(tmp_path / "fresh"), **SMALL))
    assert grown.path == first.path and grown.content_hash == fresh.content_hash
    assert open_store(grown.path).content_hash == fresh.content_hash
    # `saekit ls` of the bucket's root lists the store, once (not its arrays' zarr.json)
    from saekit.cli.main import main

    listing = list_stores(root)
    assert [(str(s.path), s.ok) for s in listing] == [(str(grown.path), True)]
    assert "complete  5,000 rows" in listing[0].summary
    monkeypatch.setattr("sys.argv", ["saekit", "ls", root])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None) and str(grown.path) in capsys.readouterr().out

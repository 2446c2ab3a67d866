"""A shared cache root: a harvest finds its store by identity instead of recomputing it, serves a
smaller request from a bigger store, and extends a smaller one in place (local and on S3)."""

import pytest
import torch
from cli_checks import one_error

import saekit.harvest.loop
from saekit.errors import SaekitError
from saekit.harvest import HarvestConfig, run
from saekit.store import list_stores, open_store

SMALL = dict(shard_rows=1024, chunk_rows=256, device="cpu", progress=False)
HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


@pytest.fixture
def forwards(monkeypatch):
    """Counts forward passes of the model (the work a cache root exists to save)."""
    calls = []
    real = saekit.harvest.loop.forward_acts
    monkeypatch.setattr(saekit.harvest.loop, "forward_acts", lambda *a, **k: calls.append(1) or real(*a, **k))
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


# -- review findings: each failed before its fix ---------------------------------------------------


def stop_after(monkeypatch, batches: int):
    """The next harvest stops (KeyboardInterrupt) after `batches` forward passes, like a Ctrl-C:
    the shards already handed to the writer land, nothing else."""
    real, calls = saekit.harvest.loop.forward_acts, []

    def fwd(*a, **k):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(saekit.harvest.loop, "forward_acts", fwd)


def test_an_extension_copies_the_old_rows_never_recomputes_them(tmp_path, monkeypatch):
    """A forward pass that differs in the last bit (another GPU kernel for another batch shape)
    must not change rows a complete store already has."""
    root = str(tmp_path / "root")
    first = run(HarvestConfig(tokens=3000, cache_root=root, **SMALL))
    before = open_store(first.path)
    old = {k: v.clone() for k, v in (("acts", before.rows(None, 0, 3000)), ("tok", before.tokens(0, 3000)))}
    real = saekit.harvest.loop.forward_acts
    monkeypatch.setattr(
        saekit.harvest.loop,
        "forward_acts",
        lambda *a, **k: {h: (x.view(torch.int16) ^ 1).view(torch.bfloat16) for h, x in real(*a, **k).items()},
    )
    grown = open_store(run(HarvestConfig(tokens=5000, cache_root=root, **SMALL)).path)
    assert torch.equal(grown.rows(None, 0, 3000).view(torch.int16), old["acts"].view(torch.int16))
    assert torch.equal(grown.tokens(0, 3000), old["tok"]) and grown.verify() == []
    new = grown.rows(None, 3000, 5000).view(torch.int16)
    monkeypatch.undo()
    fresh = open_store(run(HarvestConfig(tokens=5000, out=str(tmp_path / "f"), **SMALL)).path)
    assert torch.equal(new, fresh.rows(None, 3000, 5000).view(torch.int16) ^ 1)  # computed, by the new pass


def test_an_interrupted_extension_leaves_the_store_as_it_was_and_a_smaller_request_is_exact(tmp_path, monkeypatch):
    import zarr

    root = str(tmp_path / "root")
    first = run(HarvestConfig(tokens=3000, cache_root=root, **SMALL))
    stop_after(monkeypatch, 1)  # one batch of 32 sequences (rows ~2,900-7,000): shards 2 to 5 land
    with pytest.raises(KeyboardInterrupt):
        run(HarvestConfig(tokens=9000, cache_root=root, **SMALL))
    store = open_store(first.path)  # still the complete 3,000-row store, every array that long
    assert store.n_rows == 3000 and store.content_hash == first.content_hash and store.verify() == []
    assert zarr.open_group(str(first.path), mode="r")["tokens"].shape == (3000,)
    monkeypatch.undo()
    grown = run(HarvestConfig(tokens=4000, cache_root=root, **SMALL))
    fresh = run(HarvestConfig(tokens=4000, out=str(tmp_path / "fresh"), **SMALL))
    assert grown.n_rows == 4000 and grown.content_hash == fresh.content_hash


def test_unfinished_store_in_a_cache_root_resumes_from_another_copy_of_the_data_and_overwrites(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "texts.txt").write_text("the residual stream of a small model\n" * 400)
    cfg = dict(hooks=HOOKS[::-1], cache_root=root, **SMALL)
    stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(HarvestConfig(dataset=str(tmp_path / "a" / "texts.txt"), tokens=12000, **cfg))
    monkeypatch.undo()
    # the same data at another path, the hooks in another order: the same store, resumed
    done = run(
        HarvestConfig(dataset=str(tmp_path / "b" / "texts.txt"), tokens=12000, hooks=HOOKS, cache_root=root, **SMALL)
    )
    fresh = run(HarvestConfig(dataset=str(tmp_path / "a" / "texts.txt"), tokens=12000, out=str(tmp_path / "f"), **cfg))
    assert done.content_hash == fresh.content_hash
    # an unfinished one of another size is replaced by --overwrite
    stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(HarvestConfig(dataset=str(tmp_path / "a" / "texts.txt"), tokens=9000, overwrite=True, **cfg))
    monkeypatch.undo()
    again = run(HarvestConfig(dataset=str(tmp_path / "a" / "texts.txt"), tokens=3000, overwrite=True, **cfg))
    assert again.path == done.path and again.n_rows == 3000


def test_a_damaged_sibling_does_not_block_the_cache_root(tmp_path, forwards):
    root = tmp_path / "root"
    first = run(HarvestConfig(tokens=2000, cache_root=str(root), **SMALL))
    sibling = first.path.parent / "blocks.0.hook_resid_pre"
    sibling.mkdir()
    (sibling / "zarr.json").write_text("{ not json")
    forwards.clear()
    assert run(HarvestConfig(tokens=2000, cache_root=str(root), **SMALL)).path == first.path and forwards == []


def test_remote_extension_keeps_shards_without_records_and_a_stray_probe_is_no_obstacle(s3_bucket, tmp_path, forwards):
    from saekit.store.copy import CopyConfig, copy_store
    from saekit.store.remote import Remote

    local = run(HarvestConfig(tokens=3000, cache_root=str(tmp_path / "local-root"), **SMALL))
    rel = local.path.relative_to(tmp_path / "local-root").as_posix()
    root = f"{s3_bucket}/root"
    copy_store(CopyConfig(src=str(local.path), dst=f"{root}/{rel}", progress=False))  # no completion records
    Remote(f"{root}/{rel}").write_bytes(".saekit-write-test-999", b"")  # left by a killed process
    forwards.clear()
    grown = run(HarvestConfig(tokens=5000, cache_root=root, staging=str(tmp_path / "st"), **SMALL))
    extending, forwards[:] = len(forwards), []
    fresh = run(HarvestConfig(tokens=5000, out=str(tmp_path / "fresh"), **SMALL))
    assert grown.path == f"{root}/{rel}" and grown.content_hash == fresh.content_hash
    assert 0 < extending < len(forwards)  # the kept shards were not computed again
    probe = run(HarvestConfig(tokens=1000, out=f"{s3_bucket}/probe", staging=str(tmp_path / "st"), **SMALL))
    assert probe.n_rows == 1000


def test_a_checkpoint_with_one_neuron_edited_is_another_store(tmp_path, forwards):
    """The weights' identity reads every byte: zeroing the input weights of one MLP neuron (a
    column a strided sample never reaches) is another model, so the cache root harvests anew."""
    import shutil
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sources import make_tiny_gpt2

    orig = make_tiny_gpt2(tmp_path / "a" / "tiny-gpt2", n_embd=256, n_layer=1)  # W_in [256, 1024]
    edited = tmp_path / "b" / "tiny-gpt2"  # the same folder name: the same identity folder
    shutil.copytree(orig, edited)
    weights = load_file(edited / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][:, 1] = 0  # neuron 1's input weights
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})

    root = str(tmp_path / "root")
    kw = dict(hooks=["blocks.0.hook_mlp_out"], tokens=500, ctx_len=32, cache_root=root, **SMALL)
    first = run(HarvestConfig(model=str(orig), **kw))
    forwards.clear()
    second = run(HarvestConfig(model=str(edited), **kw))
    assert forwards and second.path != first.path and second.content_hash != first.content_hash
    a, b = open_store(first.path), open_store(second.path)
    assert not torch.equal(a.rows(None, 0, 500), b.rows(None, 0, 500))


@pytest.mark.parametrize("where", ["--cache-root", "SAEKIT_CACHE", "--out"])
@pytest.mark.parametrize("url", ["s3://", "s3:///", "gs://"])
def test_a_url_that_names_no_bucket_is_one_line_and_never_a_local_folder(tmp_path, monkeypatch, forwards, where, url):
    """`--cache-root s3://` once became the local folder `s3:`: every URL-shaped argument goes
    through the one URL check, which wants a bucket after the scheme."""
    monkeypatch.chdir(tmp_path)
    if where == "SAEKIT_CACHE":
        monkeypatch.setenv("SAEKIT_CACHE", url)
        cfg = dict()
    else:
        cfg = {where[2:].replace("-", "_"): url}
    with pytest.raises(SaekitError, match="names no bucket") as e:
        run(HarvestConfig(tokens=500, **SMALL, **cfg))
    assert "\n" not in str(e.value) and forwards == [] and list(tmp_path.iterdir()) == []


def _second_harvest_during_the_first(monkeypatch, first: HarvestConfig, second: list):
    """Harvest `first` in this process; at its first forward pass, `saekit harvest SECOND` runs in
    another process, to its end. Returns (the first's result, the second's CompletedProcess)."""
    from cli_checks import saekit as cli

    other = []
    forward = saekit.harvest.loop.forward_acts

    def once(*a, **k):
        if not other:
            other.append(cli(*second))
        return forward(*a, **k)

    monkeypatch.setattr(saekit.harvest.loop, "forward_acts", once)
    return run(first), other[0]


@pytest.mark.slow
def test_a_second_harvest_of_a_store_being_written_is_one_line_and_leaves_it_whole(tmp_path, monkeypatch):
    root = tmp_path / "root"
    first, r = _second_harvest_during_the_first(
        monkeypatch,
        HarvestConfig(tokens=3000, cache_root=str(root), **SMALL),
        [
            "harvest",
            "--tokens",
            3000,
            "--cache-root",
            root,
            "--shard-rows",
            1024,
            "--chunk-rows",
            256,
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    one_error(r.returncode, r.stderr, "another process is writing the store", "wait for it to finish")
    st = open_store(first.path)
    assert st.verify() == [] and st.content_hash == first.content_hash
    assert sorted(p.name for p in first.path.iterdir() if p.name.startswith(".")) == []  # no records left behind


@pytest.mark.slow
def test_a_second_harvest_to_the_same_url_is_one_line_and_leaves_the_first_whole(s3_bucket, tmp_path, monkeypatch):
    url, staging = f"{s3_bucket}/st", tmp_path / "staging"
    first, r = _second_harvest_during_the_first(
        monkeypatch,
        HarvestConfig(tokens=3000, out=url, staging=str(staging), **SMALL),
        ["harvest", "--tokens", 3000, "--out", url, "--staging", staging, "--shard-rows", 1024, "--chunk-rows", 256,
         "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    one_error(r.returncode, r.stderr, f"another process on this machine is writing {url}")
    assert open_store(url).verify() == [] and open_store(url).content_hash == first.content_hash

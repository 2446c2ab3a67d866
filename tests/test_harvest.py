"""`saekit harvest` end to end: the embedded default, a local HF checkpoint with jsonl texts,
bitwise agreement with run_with_cache, resume after SIGKILL, 2-rank torchrun == 1 rank, the lazy
cached_activation_generator, and every user-facing error (one line, non-zero exit)."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit import models, texts
from saekit.errors import SaekitError
from saekit.harvest import HarvestConfig, run
from saekit.harvest.generator import cached_activation_generator
from saekit.store import RECORDS_DIR, open_store

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_sources import make_tiny_gpt2  # noqa: E402

HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]
SMALL = dict(shard_rows=256, chunk_rows=64, ctx_len=32, batch_size=8, progress=False)  # many shards, fast
# Subprocesses: one thread each (the machine is shared), never the network.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("harvest"))


def make_data(root: Path) -> tuple[Path, str, str]:
    """A tiny GPT-2 checkpoint and jsonl texts: documents of 1 to ~150 tokens."""
    ckpt = make_tiny_gpt2(root / "tiny-gpt2")
    g = torch.Generator().manual_seed(0)
    words = "the a sparse feature model token layer residual stream dictionary code of in on with".split()
    with open(root / "texts.jsonl", "w") as f:
        for i in range(400):
            n = [1, 3, 12, 40, 120][int(torch.randint(0, 5, (1,), generator=g))]
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return root, str(ckpt), str(root / "texts.jsonl")


def cfg_for(data, out, **kw) -> HarvestConfig:
    _, ckpt, texts = data
    return HarvestConfig(
        **{
            "model": ckpt,
            "dataset": texts,
            "hooks": HOOKS,
            "out": str(out),
            "tokens": 3000,
            "device": "cpu",
            **SMALL,
            **kw,
        }
    )


def cli(*args, capsys=None):
    """Run `saekit ...` in-process through the real entry point; returns (exit code, stderr)."""
    from saekit.cli.main import main

    old = sys.argv
    sys.argv = ["saekit", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    return code, capsys.readouterr().err if capsys else ""


def assert_one_line_error(code, err, pattern):
    import re

    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Loading weights", "harvest"))]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path):
    """No --model/--dataset/--hook: the embedded model and corpus, the middle layer, ./cache."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "saekit.cli.main",
            "harvest",
            "--tokens",
            "1500",
            "--shard-rows",
            "512",
            "--chunk-rows",
            "128",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (out,) = (tmp_path / "cache" / "saekit-embedded").glob("embedded-*/blocks.2.hook_resid_pre")  # the cache root
    store = open_store(out)
    assert store.hooks == ["blocks.2.hook_resid_pre"] and store.d_model(None) == 128
    assert store.n_rows == 1500
    # stdout is the result alone (transformer-lens's progress prints go to stderr): STORE=$(saekit harvest)
    assert r.stdout.splitlines() == [f"{out.relative_to(tmp_path)}  1,500 rows  {store.content_hash}"]
    assert store.meta["model"]["source"] == "embedded" and store.meta["ctx_len"] == 128
    # Rows follow the corpus byte by byte: sequence 0 is BOS + the first 127 bytes, BOS skipped.
    from saekit.embedded import load_embedded_corpus

    first = load_embedded_corpus()[0].encode("utf-8")
    assert store.tokens(0, 127).tolist() == list(first[:127])
    assert store.positions(0, 128).tolist() == list(range(1, 128)) + [1]
    assert not (store.rows(None, 0, 1500).float() == 0).all(-1).any()  # every row written


def test_local_checkpoint_store_equals_run_with_cache(data, tmp_path):
    """Values are the model's own hook outputs rounded to bf16 (bitwise, fp32 model), tokens and
    positions trace back to the text, and no document is dropped."""
    res = run(cfg_for(data, tmp_path / "s", dtype="fp32", skip_first_n_tokens=2))
    store = open_store(res.path)
    assert store.n_rows == 3000 and store.content_hash == res.content_hash
    assert store.meta["model"]["source"] == "hf_local" and store.meta["dtype"] == "float32"

    lm = models.load_model(data[1], torch.device("cpu"), torch.float32)
    source = texts.load_texts(data[2])
    per_seq = 30
    n_seq = -(-3000 // per_seq)
    seqs = torch.tensor(list(texts.sequences(lm.model, source, 32))[:n_seq])
    for b in range(0, n_seq, 8):  # the harvest's batches
        with torch.no_grad():
            _, cache = lm.model.run_with_cache(seqs[b : b + 8], names_filter=HOOKS)
        lo, hi = b * per_seq, min((b + 8) * per_seq, 3000)
        for h in HOOKS:
            want = cache[h][:, 2:].reshape(-1, cache[h].shape[-1]).to(torch.bfloat16)[: hi - lo]
            got = store.rows(h, lo, hi)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (h, b)
    assert torch.equal(store.tokens(0, 3000), seqs[:, 2:].reshape(-1)[:3000].to(torch.int32))
    assert torch.equal(store.positions(0, 3000), torch.arange(2, 32).repeat(n_seq)[:3000].to(torch.int32))

    # Packing: the stored token stream is every document + separator, in order, none dropped.
    tok = lm.model.tokenizer
    stream = [t for d in source.docs() for t in (*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    seq_stream = seqs[:, 1:].reshape(-1).tolist()
    assert seq_stream == stream[: len(seq_stream)]


def test_several_hooks_in_one_pass_equal_separate_harvests(data, tmp_path):
    both = open_store(run(cfg_for(data, tmp_path / "both", tokens=600)).path)
    one = open_store(run(cfg_for(data, tmp_path / "one", tokens=600, hooks=[HOOKS[1]])).path)
    assert torch.equal(both.rows(HOOKS[1], 0, 600).view(torch.int16), one.rows(HOOKS[1], 0, 600).view(torch.int16))
    assert torch.equal(both.tokens(0, 600), one.tokens(0, 600))


def test_dataset_shorter_than_budget_keeps_what_exists(data, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": "the sparse code of a layer " * k}) + "\n" for k in (1, 2, 30)))
    store = open_store(run(cfg_for(data, tmp_path / "s", dataset=str(small), tokens=100_000)).path)
    assert 0 < store.n_rows < 1000 and store.n_rows % 31 == 0  # whole sequences, store finalized


# -- resume ---------------------------------------------------------------------------------------


def _child(cfg):
    torch.set_num_threads(1)
    run(cfg)


def _created(out: Path) -> bool:
    # Killing inside create_store's own metadata write is the store's business; start after it.
    try:
        return "n_rows" in json.loads((out / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _records(out: Path) -> int:
    d = out / RECORDS_DIR
    return len(list(d.glob("*.json"))) if d.exists() else 0


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_store(data, tmp_path, capsys):
    want = run(cfg_for(data, tmp_path / "ref", tokens=40_000)).content_hash
    out = tmp_path / "killed"
    ctx = mp.get_context("fork")  # the child inherits the imported modules: starts in milliseconds
    kills = []
    for at in (0, 3, 30):  # right after creation, a few shards in, most of the way
        p = ctx.Process(target=_child, args=(cfg_for(data, out, tokens=40_000, resume=True),))
        p.start()
        deadline = time.time() + 120
        while not (_created(out) and _records(out) >= at) and p.is_alive() and time.time() < deadline:
            time.sleep(0.002)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        kills.append(_records(out))
    assert kills[1] >= 3 and kills[2] >= 30, kills  # each kill landed where intended
    with pytest.raises(SaekitError, match="incomplete"):
        open_store(out)
    # Finished shards damaged while nothing ran: resume checks them against their records.
    done = sorted(int(p.stem.split("-")[1]) for p in (out / RECORDS_DIR).glob("shard-*.json"))
    flip(out / "acts" / HOOKS[0] / "c" / str(done[0]) / "0")
    (out / "tokens" / "c" / str(done[1])).unlink()
    args = [
        "harvest",
        "--model",
        data[1],
        "--dataset",
        data[2],
        *sum((["--hook", h] for h in HOOKS), []),
        "--out",
        str(out),
        "--tokens",
        "40000",
        "--ctx-len",
        "32",
        "--batch-size",
        "8",
        "--shard-rows",
        "256",
        "--chunk-rows",
        "64",
        "--device",
        "cpu",
        "--resume",
    ]
    code, _ = cli(*args)
    assert code == 0
    store = open_store(out)
    assert store.content_hash == want and store.verify() == []
    # A finished store resumed again is left alone...
    assert run(cfg_for(data, out, tokens=40_000, resume=True)).content_hash == want
    # ...after checking it: a damaged one is named, not reported complete.
    flip(out / "acts" / HOOKS[1] / "c" / "5" / "0")
    capsys.readouterr()
    code, err = cli(*args, capsys=capsys)
    assert_one_line_error(code, err, rf"acts/{HOOKS[1]}/c/5/0: corrupt.*--overwrite")


def flip(f: Path, at: int = 100) -> None:
    """Flip one bit of a file in place (rows region of a shard file, index untouched)."""
    raw = bytearray(f.read_bytes())
    raw[at] ^= 0x10
    f.write_bytes(bytes(raw))


def _child_killed_at_creation(cfg, progress: Path):
    import saekit.store.shards as shards

    def stuck(*a, **k):  # the store's arrays exist, its attributes do not: the kill lands here
        progress.write_text("1")
        time.sleep(600)

    shards.write_group_attrs = stuck
    _child(cfg)


def test_sigkill_during_store_creation_then_resume_or_overwrite(data, tmp_path):
    want = run(cfg_for(data, tmp_path / "ref")).content_hash
    ctx = mp.get_context("fork")
    for flag in ("--resume", "--overwrite"):
        out, progress = tmp_path / flag.strip("-"), tmp_path / f"progress{flag}"
        p = ctx.Process(target=_child_killed_at_creation, args=(cfg_for(data, out), progress))
        p.start()
        deadline = time.time() + 120
        while not progress.exists() and p.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert (out / "acts").is_dir() and not _created(out)
        code, _ = cli(
            "harvest",
            "--model",
            data[1],
            "--dataset",
            data[2],
            *sum((["--hook", h] for h in HOOKS), []),
            "--out",
            str(out),
            "--tokens",
            "3000",
            "--ctx-len",
            "32",
            "--batch-size",
            "8",
            "--shard-rows",
            "256",
            "--chunk-rows",
            "64",
            "--device",
            "cpu",
            flag,
        )
        assert code == 0
        assert open_store(out).content_hash == want


def test_disk_full_says_so_and_stays_resumable(data, tmp_path, tmpfs, capsys):
    """A real full disk (a tmpfs about half the store's size): one line, then --resume on a
    bigger disk finishes with the same content hash as an uninterrupted harvest."""
    ref = run(cfg_for(data, tmp_path / "ref"))
    size = sum(f.stat().st_size for f in ref.path.rglob("*") if f.is_file())
    disk = tmpfs(size // 2)
    out = disk / "full"
    code, err = cli(
        "harvest",
        "--model",
        data[1],
        "--dataset",
        data[2],
        *sum((["--hook", h] for h in HOOKS), []),
        "--out",
        str(out),
        "--tokens",
        "3000",
        "--ctx-len",
        "32",
        "--batch-size",
        "8",
        "--shard-rows",
        "256",
        "--chunk-rows",
        "64",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert_one_line_error(code, err, r"disk full.*--resume")
    tmpfs.remount(disk, 4 * size)
    assert run(cfg_for(data, out, resume=True)).content_hash == ref.content_hash


# -- distributed ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_torchrun_equals_one_rank(data, tmp_path):
    want = run(cfg_for(data, tmp_path / "one", tokens=5000)).content_hash
    out = tmp_path / "two"
    args = [
        "--model",
        data[1],
        "--dataset",
        data[2],
        *sum((["--hook", h] for h in HOOKS), []),
        "--out",
        str(out),
        "--tokens",
        "5000",
        "--ctx-len",
        "32",
        "--batch-size",
        "8",
        "--shard-rows",
        "256",
        "--chunk-rows",
        "64",
        "--device",
        "cpu",
    ]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "saekit.cli.main",
            "harvest",
            *args,
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    store = open_store(out)
    assert store.content_hash == want and store.n_rows == 5000


# -- the original API -----------------------------------------------------------------------------


def test_cached_activation_generator_is_lazy_then_cached(data, tmp_path, monkeypatch):
    import datasets

    import saekit.harvest.loop

    model = models.load_model(data[1], torch.device("cpu"), torch.float32).model
    docs = [json.loads(line)["text"] for line in open(data[2])]
    ds = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()  # stands in for a streamed dataset
    calls = []
    real = saekit.harvest.loop.forward_acts
    monkeypatch.setattr(saekit.harvest.loop, "forward_acts", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(
        hook_name="blocks.1.hook_resid_pre",
        activation_batch_size=100,
        generator_batch_size=4,
        acts_per_run=1000,
        ctx_len=32,
        skip_first_n_tokens=1,
        save_to_disk=str(tmp_path / "acts"),
    )

    gen = cached_activation_generator(model, ds, **kw)
    first = next(gen)
    assert first.shape == (100, 32) and len(calls) == 1  # one model batch (4 x 31 rows) for the first 100
    rest = [first, *[next(gen) for _ in range(24)]]  # 2500 rows: two full runs and part of a third
    gen.close()
    n_calls = len(calls)

    again = cached_activation_generator(model, ds, **kw)
    replay = [next(again) for _ in range(25)]
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(rest, replay))
    assert len(calls) - n_calls <= 5  # only the unfinished third run's unwritten shard is recomputed
    stores = sorted((tmp_path / "acts").iterdir())
    assert [p.name for p in stores][:2] == ["run-00000", "run-00001"] and open_store(stores[0]).n_rows == 1023


def test_cached_activation_generator_takes_any_run_size(data, tmp_path):
    """A run of 5022 rows (acts_per_run 5000, 31 rows per sequence) is one store; its rows are the
    packed stream's, bit for bit the rows `saekit harvest` stores for the same texts."""
    model = models.load_model(data[1], torch.device("cpu"), torch.float32).model
    gen = cached_activation_generator(
        model,
        data[2],
        hook_name=HOOKS[0],
        activation_batch_size=1000,
        acts_per_run=5000,
        ctx_len=32,
        save_to_disk=str(tmp_path / "acts"),
        max_runs=1,
    )
    rows = torch.cat(list(gen))
    want = open_store(run(cfg_for(data, tmp_path / "s", tokens=5022, dtype="fp32", hooks=[HOOKS[0]])).path)
    assert rows.shape == (5022, 32) and open_store(tmp_path / "acts" / "run-00000").n_rows == 5022
    assert torch.equal(rows.view(torch.int16), want.rows(HOOKS[0], 0, 5022).view(torch.int16))


@pytest.mark.parametrize("first", ["saekit.harvest", "sae_kit.utils"])
@pytest.mark.slow
def test_generator_import_paths_named_in_the_docs_work_in_any_order(first):
    """Its home is saekit.harvest.generator (built on saekit.harvest); saekit.harvest and sae_kit.utils
    still give it, whichever module a program imports first."""
    code = (
        f"import {first}\n"
        "import saekit.harvest.generator, sae_kit.utils\n"
        "from saekit.harvest import cached_activation_generator as old\n"
        "assert old is saekit.harvest.generator.cached_activation_generator is sae_kit.utils.cached_activation_generator\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- errors ---------------------------------------------------------------------------------------


def test_errors_are_one_line(data, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline the hub answers "not found" at once instead of retrying for half a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _, ckpt, texts = data
    base = [
        "harvest",
        "--model",
        ckpt,
        "--dataset",
        texts,
        "--ctx-len",
        "32",
        "--device",
        "cpu",
        "--tokens",
        "500",
        "--shard-rows",
        "256",
        "--chunk-rows",
        "64",
    ]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    cases = [
        (["harvest", "--model", "gpt2-smal", "--out", str(tmp_path / "a")], r"unknown model 'gpt2-smal'.*gpt2-small"),
        (
            [*base, "--hook", "blocks.1.hook_resid_pr", "--out", str(tmp_path / "b")],
            r"unknown hook 'blocks.1.hook_resid_pr'.*closest: blocks.1.hook_resid_pre",
        ),
        (
            [*base[:4], "no-such-user/no-such-dataset", *base[5:], "--out", str(tmp_path / "c")],
            r"dataset 'no-such-user/no-such-dataset' could not be opened",
        ),
        (
            [*base[:4], str(tmp_path / "body.jsonl"), *base[5:], "--out", str(tmp_path / "d")],
            r"no column 'text' \(columns: body\).*--text-column",
        ),
        ([*base[:4], str(tmp_path / "empty.jsonl"), *base[5:], "--out", str(tmp_path / "e")], r"empty"),
        (
            ["harvest", "--model", ckpt, "--dataset", texts, "--ctx-len", "65", "--out", str(tmp_path / "f")],
            r"--ctx-len 65 is above the model's n_ctx 64",
        ),
    ]
    for args, pattern in cases:
        code, err = cli(*args, capsys=capsys)
        assert_one_line_error(code, err, pattern)
    assert not any((tmp_path / x).exists() for x in "abcdef"), "a failed harvest must not leave a store behind"

    # --out holding a store: refused without --resume, and with --resume if the arguments differ.
    assert cli(*base, "--out", str(tmp_path / "g"), capsys=capsys)[0] == 0
    code, err = cli(*base, "--out", str(tmp_path / "g"), capsys=capsys)
    assert_one_line_error(code, err, r"--resume.*--overwrite")
    code, err = cli(*base[:-5], "800", *base[-4:], "--out", str(tmp_path / "g"), "--resume", capsys=capsys)
    assert_one_line_error(code, err, r"different metadata \(differs in: tokens\)")
    assert cli(*base, "--out", str(tmp_path / "g"), "--overwrite", capsys=capsys)[0] == 0


def test_damaged_store_or_file_as_out_is_one_line(data, tmp_path, capsys):
    _, ckpt, texts = data
    base = [
        "harvest",
        "--model",
        ckpt,
        "--dataset",
        texts,
        "--ctx-len",
        "32",
        "--device",
        "cpu",
        "--tokens",
        "500",
        "--shard-rows",
        "256",
        "--chunk-rows",
        "64",
    ]
    out = tmp_path / "s"
    assert cli(*base, "--out", str(out), capsys=capsys)[0] == 0
    good = (out / "zarr.json").read_text()

    doc = json.loads(good)
    doc["attributes"]["hooks"] = [1, 2]  # wrong type: hand-edited or a bad copy
    (out / "zarr.json").write_text(json.dumps(doc))
    code, err = cli(*base, "--out", str(out), "--resume", capsys=capsys)
    assert_one_line_error(code, err, r"damaged attributes: hooks is \[1, 2\].*restore zarr.json or re-harvest")

    (out / "zarr.json").write_text(good[: len(good) // 2])  # cut short
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for flag in ("--resume", "--overwrite"):
        code, err = cli(*base, "--out", str(out), flag, capsys=capsys)
        assert_one_line_error(code, err, r"zarr.json is damaged \(not valid JSON\).*left as it is; restore zarr.json")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # --overwrite deleted nothing

    (tmp_path / "f").write_text("not a directory")
    code, err = cli(*base, "--out", str(tmp_path / "f"), capsys=capsys)
    assert_one_line_error(code, err, r"is a file, not a directory; choose a directory path")


def _gen_rows(model, ds, acts, **kw):
    """(rows the generator hands out, the SaekitError that stopped it or None)."""
    kw = dict(
        hook_name=HOOKS[0], activation_batch_size=100, generator_batch_size=8, acts_per_run=1000, ctx_len=32, **kw
    )
    got = []
    try:
        for x in cached_activation_generator(model, ds, save_to_disk=str(acts), **kw):
            got.append(x)
    except SaekitError as e:
        return (torch.cat(got) if got else torch.empty(0, 32, dtype=torch.bfloat16)), e
    return torch.cat(got), None


@pytest.mark.parametrize(
    "first, then, refused",
    [
        ("all", "filter", True),  # keeps the first 16 documents, drops the 21st
        ("take20", "take400", True),  # a shorter stream cached first: it ends where this one goes on
        ("take400", "take20", False),  # a longer one cached first: its rows are this one's, as far as it goes
    ],
)
def test_cached_activation_generator_never_serves_another_streams_rows(data, tmp_path, first, then, refused):
    """A streamed dataset's cache key hashes only its first documents, so another stream with the
    same start (a filter, another take) finds the same runs. Every row served must be the row a
    fresh run on this stream gives; a cached run that is not this stream's is one line, not rows."""
    import datasets

    model = models.load_model(data[1], torch.device("cpu"), torch.float32).model
    words = "the a sparse feature model token layer residual stream dictionary code of in on with".split()
    docs = [{"text": " ".join(words[(7 * i + j) % 15] for j in range(1 + i % 5)), "id": i} for i in range(300)]
    ds = datasets.Dataset.from_list(docs).to_iterable_dataset()  # short documents: many in each run
    streams = {
        "all": ds,
        "filter": ds.filter(lambda r: r["id"] != 20),
        "take20": ds.take(20),
        "take400": ds.take(400),
    }
    _gen_rows(model, streams[first], tmp_path / "acts", max_runs=3)
    want, err = _gen_rows(model, streams[then], tmp_path / "fresh", max_runs=3)
    assert err is None
    got, err = _gen_rows(model, streams[then], tmp_path / "acts", max_runs=3)
    assert torch.equal(got.view(torch.int16), want[: len(got)].view(torch.int16))
    assert (err is not None) == refused
    if err is None:
        assert len(got) == len(want)
    else:
        assert "\n" not in str(err) and "save_to_disk" in str(err), err

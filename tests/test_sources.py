"""Harvest inputs: packing, local text formats, model loading (local HF checkpoint with no network,
name and hook errors), bad input (one `error:` line from the real CLI, nothing written), and the
shipped embedded model, tokenizer and corpus."""

import codecs
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from saekit import embedded, models, texts
from saekit.errors import SaekitError

CPU = torch.device("cpu")


def make_tiny_gpt2(out, n_ctx: int = 64, seed: int = 0, n_embd: int = 32, n_layer: int = 2):
    """A tiny GPT-2 (random weights) + a byte-level BPE tokenizer trained offline, saved HF-style."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders find features in activations."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    # n_ctx mirrors the hub's gpt2 config.json, which carries it beside n_positions.
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_ctx,
        n_ctx=n_ctx,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("ckpt") / "tiny-gpt2")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- packing --------------------------------------------------------------------------------------


def test_pack_keeps_every_document_and_cuts_full_sequences():
    docs = [[1, 2], [3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]  # short ones included
    p = texts.Packing(ctx_len=5, bos_id=99, sep_id=0)
    seqs = list(texts.pack(docs, p))
    assert all(len(s) == 5 and s[0] == 99 for s in seqs)
    stream = [t for s in seqs for t in s[1:]]
    expected = [t for d in docs for t in (*d, 0)]
    # every token of every document, in order, separators between; only a tail < one sequence is left
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 4


def test_pack_without_bos():
    seqs = list(texts.pack([[1, 2, 3, 4, 5, 6, 7]], texts.Packing(3, None, None)))
    assert seqs == [[1, 2, 3], [4, 5, 6]]


# -- texts ----------------------------------------------------------------------------------------


def test_local_text_formats_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first doc", "a second, longer document", "", "third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for spec, kw in [("d.jsonl", {}), ("d.parquet", {}), ("saved", {}), ("saved_dict", {"split": "test"})]:
        src = texts.load_texts(str(tmp_path / spec), text_column="body", **kw)
        assert list(src.docs()) == docs, spec
        assert list(src.docs()) == docs, f"{spec}: a second pass must give the same documents"
    (tmp_path / "book.txt").write_text("line one\n\nline two\n")
    assert list(texts.load_texts(str(tmp_path / "book.txt")).docs()) == ["line one\n\nline two\n"]


def test_text_errors_name_the_fix(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SaekitError, match="no column 'text'.*body.*--text-column"):
        list(texts.load_texts(str(tmp_path / "d.jsonl")).docs())
    with pytest.raises(SaekitError, match="no such file"):
        texts.load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(SaekitError, match="unsupported file type"):
        texts.load_texts(str(tmp_path / "d.csv"))


def test_in_memory_dataset_identity_tracks_content():
    import datasets

    a = datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).to_iterable_dataset()
    b = datasets.Dataset.from_dict({"text": ["alpha", "gamma"]}).to_iterable_dataset()
    ma, mb = texts.dataset_source(a).meta, texts.dataset_source(b).meta
    assert ma["head_sha256"] != mb["head_sha256"]
    assert texts.dataset_source(a).meta == ma  # stable
    assert list(texts.dataset_source(a).docs()) == ["alpha", "beta"]


# -- models and hooks -----------------------------------------------------------------------------


def test_local_checkpoint_loads_offline_and_matches_hf(tiny_ckpt, no_network):
    from transformers import GPT2LMHeadModel

    lm = models.load_model(str(tiny_ckpt), CPU, torch.float32)
    assert lm.name == "tiny-gpt2" and lm.meta["source"] == "hf_local"
    model = lm.model
    tokens = torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer.encode("the lazy fox")])
    hf = GPT2LMHeadModel.from_pretrained(str(tiny_ckpt), local_files_only=True).eval()
    with torch.no_grad():
        want = hf(tokens).logits.log_softmax(-1)
        got = model(tokens).log_softmax(-1)  # unembed centering shifts logits, not log-probs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_model_suggests_close_names():
    with pytest.raises(SaekitError, match=r"unknown model 'gpt2-smal'.*closest:.*gpt2-small"):
        models.load_model("gpt2-smal", CPU, torch.float32)


def test_unknown_hook_lists_closest(tiny_ckpt):
    model = models.load_model(str(tiny_ckpt), CPU, torch.float32).model
    with pytest.raises(SaekitError, match=r"unknown hook 'blocks.1.hook_resid_pr'.*closest: blocks.1.hook_resid_pre"):
        models.resolve_hooks(model, ["blocks.1.hook_resid_pr"])
    with pytest.raises(SaekitError, match="not a per-token activation"):
        models.resolve_hooks(model, ["blocks.0.attn.hook_pattern"])
    specs = models.resolve_hooks(model, ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
    assert [(h.d, h.layer) for h in specs] == [(32, 1), (32, 0)]  # hook_z: heads * d_head flattened
    assert models.stop_layer(specs, 2) == 2
    assert models.stop_layer(models.resolve_hooks(model, ["ln_final.hook_normalized"]), 2) is None


# -- the embedded default ---------------------------------------------------------------------


def test_embedded_tokenizer_is_bytes():
    tok = embedded.load_embedded_tokenizer()
    text = "héllo\n\tworld ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.bos_token_id == tok.eos_token_id == embedded.EOT_ID
    assert tok.decode(ids) == text


def _structure(model, seqs):
    """Held-out loss, per-dimension std max/median, and BOS norm / mean norm of other positions."""
    with torch.no_grad():
        loss, cache = model.run_with_cache(
            torch.tensor(seqs), return_type="loss", names_filter="blocks.2.hook_resid_pre"
        )
    x = cache["blocks.2.hook_resid_pre"]  # [b, pos, d]
    sd = x[:, 1:].reshape(-1, x.shape[-1]).std(0)
    bos = x[:, 0].norm(dim=-1).mean() / x[:, 1:].norm(dim=-1).mean()
    return loss.item(), (sd.max() / sd.median()).item(), bos.item()


def test_embedded_model_is_trained_and_structured():
    """The shipped weights are trained, against a random init of the same config measured here:
    far lower loss, a BOS position that stands out, and a less isotropic residual stream."""
    model = embedded.load_embedded_model("cpu", torch.float32)
    random_init = embedded._new_model(embedded.embedded_config())
    docs = embedded.load_embedded_corpus()
    assert 0.3e6 < sum(map(len, docs)) < 2e6
    tail = texts.TextSource(lambda: iter(docs[-40:]), "corpus-tail", {})
    seqs = list(itertools.islice(texts.sequences(model, tail, 128), 16))
    loss, spread, bos = _structure(model, seqs)
    r_loss, r_spread, r_bos = _structure(random_init, seqs)
    assert loss < 2.5 < r_loss  # nats per byte; uniform over 257 tokens would be 5.55
    assert bos > r_bos + 0.5
    assert spread > r_spread


@pytest.mark.slow
def test_embedded_training_is_reproducible(tmp_path):
    cfg = embedded.TrainEmbeddedConfig(steps=2, batch_size=2, warmup=1)
    a = embedded.train(cfg, out=tmp_path / "a.safetensors")
    b = embedded.train(cfg, out=tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["corpus_sha256"] == b["corpus_sha256"]


@pytest.mark.slow
def test_corpus_regenerates_identically_on_the_same_python(tmp_path):
    from safetensors import safe_open

    with safe_open(str(embedded.WEIGHTS_PATH), "pt") as f:
        trained_on = json.loads(f.metadata()["saekit"])["python"]
    if sys.version.split()[0] != trained_on:
        pytest.skip(f"the shipped corpus comes from Python {trained_on}'s docs")
    embedded.write_corpus(tmp_path / "corpus.jsonl")
    assert (tmp_path / "corpus.jsonl").read_bytes() == embedded.CORPUS_PATH.read_bytes()


# -- bad input: one `error:` line from the real CLI, no traceback, nothing written ---------------

REPO = Path(__file__).resolve().parents[1]
# One thread each (the machine is shared) and never the network.
CLI_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": str(REPO),
}


class Refusal(NamedTuple):
    """A `saekit harvest` run that must be refused."""

    args: list
    """Arguments after `harvest --tokens 512 --device cpu --out <out>`."""
    pattern: str
    """What its one `error:` line must say (a regex)."""
    out: Path | None = None
    """An existing store to pass as --out, which must come out byte for byte unchanged."""


def _harvest(out: Path, args: list) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "saekit.cli.main",
        "harvest",
        "--tokens",
        "512",
        "--device",
        "cpu",
        "--out",
        out,
        *args,
    ]
    return subprocess.run(list(map(str, cmd)), env=CLI_ENV, capture_output=True, text=True, timeout=120, check=False)


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(cases: dict[str, Refusal], tmp_path: Path) -> None:
    """Run every case through the real CLI (two at a time: each subprocess is seconds of imports)
    and check it exits 1 with exactly one `error:` line, last, matching its pattern, no traceback,
    and no store left at its --out (or the store there unchanged)."""
    outs = {name: c.out or tmp_path / "out" / name for name, c in cases.items()}
    before = {name: _files(c.out) for name, c in cases.items() if c.out}
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(cases, pool.map(lambda n: _harvest(outs[n], cases[n].args), cases)))
    for name, r in runs.items():
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert "Traceback" not in r.stderr + r.stdout, f"{name}: {r.stderr}"
        assert r.returncode == 1 and len(errors) == 1, f"{name}: exit {r.returncode}: {r.stderr}"
        assert r.stderr.strip().splitlines()[-1] == errors[0], f"{name}: {r.stderr}"
        assert re.search(cases[name].pattern, errors[0]), f"{name}: {errors[0]}"
        if name in before:
            assert _files(outs[name]) == before[name], f"{name}: the store in --out changed"
        else:
            assert not outs[name].exists(), f"{name}: a refused harvest left {outs[name]} behind"


NOISE = bytes(random.Random(0).randrange(256) for _ in range(8192))
WORDS = ("plain ascii words " * 300).encode()


@pytest.mark.slow
def test_undecodable_and_binary_datasets_are_refused(embedded_store, tmp_path):
    files = {
        "noise.jsonl": NOISE,
        "noise.parquet": NOISE,
        # one Latin-1 byte in 11 kB: a tiny fraction, but it stands for every accented letter of
        # such a file, so it is refused like any other
        "latin1.txt": WORDS + "café".encode("latin-1") + WORDS,
        "nul.txt": WORDS + b"\0" + WORDS,  # valid UTF-8, but binary
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    store = Path(shutil.copytree(embedded_store, tmp_path / "store"))
    cases = {
        "noise.jsonl": Refusal(
            ["--dataset", tmp_path / "noise.jsonl", "--overwrite"],
            r"not UTF-8 text: byte 0x[0-9a-f]{2} at offset \d+ .*convert it",
            out=store,
        ),
        "noise.parquet": Refusal(["--dataset", tmp_path / "noise.parquet"], r"not a readable Parquet file"),
        "latin1.txt": Refusal(
            ["--dataset", tmp_path / "latin1.txt"],
            rf"not UTF-8 text: byte 0xe9 at offset {len(WORDS) + 3} .*iconv -f latin1 -t utf-8",
        ),
        "nul.txt": Refusal(["--dataset", tmp_path / "nul.txt"], rf"NUL byte at offset {len(WORDS)} .*binary"),
    }
    assert_refused(cases, tmp_path)


def test_non_regular_files_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it would wait for a writer forever
    cases = {
        "dev-zero": Refusal(["--dataset", "/dev/zero"], r"/dev/zero is a character device, not a regular file"),
        "fifo": Refusal(
            ["--dataset", tmp_path / "pipe.jsonl"], r"pipe.jsonl is a FIFO \(named pipe\), not a regular file"
        ),
    }
    assert_refused(cases, tmp_path)


@pytest.mark.slow
def test_malformed_jsonl_and_saved_datasets_are_one_line(tmp_path):
    import datasets

    (tmp_path / "list.jsonl").write_text(json.dumps({"text": "a fine first line"}) + "\n[1, 2]\n")
    datasets.Dataset.from_dict({"text": ["some text"] * 4}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "state.json").write_text("not json")
    cases = {
        "list": Refusal(["--dataset", tmp_path / "list.jsonl"], r"line 2 is a JSON array, not an object"),
        "saved": Refusal(["--dataset", tmp_path / "saved"], r"saved is a damaged save_to_disk folder"),
    }
    assert_refused(cases, tmp_path)


class Trap:
    """Unpickling this creates `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _pickled_weights(ckpt: Path, marker: Path) -> None:
    """`ckpt`'s weights saved again as a pytorch_model.bin that springs a Trap when unpickled."""
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    torch.save({**weights, "trap": Trap(marker)}, ckpt / "pytorch_model.bin")
    torch.load(ckpt / "pytorch_model.bin", weights_only=False)  # the trap works...
    assert marker.exists()
    marker.unlink()  # ...and saekit must never spring it


@pytest.mark.slow
def test_damaged_checkpoints_are_one_line_and_never_unpickled(tiny_ckpt, tmp_path):
    def variant(name: str) -> Path:
        return Path(shutil.copytree(tiny_ckpt, tmp_path / name))

    marker = tmp_path / "UNPICKLED"
    _pickled_weights(variant("pickled"), marker)
    (tmp_path / "pickled" / "model.safetensors").unlink()
    cut = variant("cut") / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:5000])
    (variant("bad-config") / "config.json").write_text("{'n_layer': 2,")
    no_tokenizer = variant("no-tokenizer")  # transformers would build a one-token tokenizer for it
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        (no_tokenizer / f).unlink()
    cases = {
        "pickled": Refusal(
            ["--model", tmp_path / "pickled"],
            r"loads only safetensors weights.*pytorch_model.bin.*safe_serialization=True",
        ),
        "cut": Refusal(["--model", cut.parent], r"model.safetensors is damaged"),
        "bad-config": Refusal(["--model", tmp_path / "bad-config"], r"config.json is not JSON"),
        "no-tokenizer": Refusal(["--model", no_tokenizer], r"no-tokenizer has no tokenizer.*tokenizer.save_pretrained"),
    }
    assert_refused(cases, tmp_path)
    assert not marker.exists(), "saekit unpickled a checkpoint file"


# -- bad input, the details (in-process: the same SaekitError the CLI prints as its one line) -----


def test_text_checks_name_the_offset_line_and_fix(tmp_path):
    files = {
        "noise.txt": NOISE,
        "utf16.txt": ("some text " * 300).encode("utf-16"),
        "late.jsonl": b'{"text": "fine"}\n' * 200 + b'{"text": "caf\xe9"}\n',
        "cut-short.txt": WORDS + "é".encode()[:1],  # a 2-byte character missing its second byte
        # past the 1 MiB read block: a character split across two blocks is fine, a bad byte is not
        "big.txt": b"x" * ((1 << 20) - 1) + "é".encode() + b"y" * 1000 + b"\xff",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = {
        "noise.txt": r"is not UTF-8 text: byte 0x[0-9a-f]{2} at offset \d+ \(line \d+\) is invalid; .*iconv",
        "utf16.txt": r"byte 0xff at offset 0 \(line 1\).*looks like UTF-16 .*`iconv -f utf-16 -t utf-8 utf16.txt > utf16.utf8.txt`",
        "late.jsonl": rf"byte 0xe9 at offset {17 * 200 + 13} \(line 201\)",
        "cut-short.txt": rf"byte 0xc3 at offset {len(WORDS)} ",
        "big.txt": rf"byte 0xff at offset {(1 << 20) + 1 + 1000} ",
    }
    for name, pattern in cases.items():
        with pytest.raises(SaekitError, match=pattern):
            texts.load_texts(str(tmp_path / name))
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(SaekitError, match="zero.txt is a character device, not a regular file"):
        texts.load_texts(str(tmp_path / "zero.txt"))
    # a UTF-8 byte-order mark is an encoding marker, not text
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + "héllo".encode())
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "h\xc3\xa9llo"}\n')
    assert list(texts.load_texts(str(tmp_path / "bom.txt")).docs()) == ["héllo"]
    assert list(texts.load_texts(str(tmp_path / "bom.jsonl")).docs()) == ["héllo"]


def test_malformed_rows_files_and_folders_name_the_problem(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # far into the file, yet refused when the source is opened: before any store exists
    fine = (json.dumps({"text": "a fine line"}) + "\n") * 1000
    for kind, line in [("string", '"a string"'), ("number", "3.5"), ("null", "null"), ("boolean", "true")]:
        (tmp_path / f"{kind}.jsonl").write_text(fine + line + "\n")
        with pytest.raises(SaekitError, match=rf"line 1001 is a JSON {kind}, not an object"):
            texts.load_texts(str(tmp_path / f"{kind}.jsonl"))
    (tmp_path / "int-text.jsonl").write_text(fine + json.dumps({"text": 3}) + "\n")
    with pytest.raises(SaekitError, match="column 'text' holds int, not text"):
        texts.load_texts(str(tmp_path / "int-text.jsonl"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(SaekitError, match="empty.parquet is not a readable Parquet file"):
        texts.load_texts(str(tmp_path / "empty.parquet"))
    pq.write_table(
        pa.table({"text": [f"document {i}" for i in range(4000)]}), tmp_path / "cut.parquet", row_group_size=500
    )
    group = pq.ParquetFile(tmp_path / "cut.parquet").metadata.row_group(5).column(0)
    data = bytearray((tmp_path / "cut.parquet").read_bytes())
    data[group.data_page_offset : group.data_page_offset + group.total_compressed_size] = (
        b"Z" * group.total_compressed_size
    )
    (tmp_path / "cut.parquet").write_bytes(data)
    with pytest.raises(SaekitError, match=r"cut.parquet is damaged past row \d+"):
        texts.load_texts(str(tmp_path / "cut.parquet"))
    pq.write_table(pa.table({"text": [None, None], "n": [1, 2]}), tmp_path / "nums.parquet")
    with pytest.raises(SaekitError, match="column 'n' holds int64, not text"):
        texts.load_texts(str(tmp_path / "nums.parquet"), text_column="n")
    datasets.Dataset.from_dict({"text": ["some text"] * 4}).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(SaekitError, match="saved is a damaged save_to_disk folder"):
        texts.load_texts(str(tmp_path / "saved"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(SaekitError, match="not a datasets save_to_disk folder .*no state.json"):
        texts.load_texts(str(tmp_path / "plain"))


def test_checkpoint_checks(tiny_ckpt, tmp_path):
    with pytest.raises(SaekitError, match="model.safetensors is a file, not a checkpoint folder"):
        models.load_model(str(tiny_ckpt / "model.safetensors"), CPU, torch.float32)
    no_weights = Path(shutil.copytree(tiny_ckpt, tmp_path / "no-weights"))
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(SaekitError, match="no-weights has no model.safetensors"):
        models.load_model(str(no_weights), CPU, torch.float32)
    (no_weights / "config.json").write_text("[1, 2]")
    with pytest.raises(SaekitError, match="config.json has no model_type"):
        models.load_model(str(no_weights), CPU, torch.float32)
    # pickled weights beside the safetensors ones are left alone
    both = Path(shutil.copytree(tiny_ckpt, tmp_path / "both"))
    _pickled_weights(both, tmp_path / "UNPICKLED")
    want = models.load_model(str(tiny_ckpt), CPU, torch.float32).meta["weights_fingerprint"]
    assert models.load_model(str(both), CPU, torch.float32).meta["weights_fingerprint"] == want
    assert not (tmp_path / "UNPICKLED").exists()


def test_checkpoint_in_a_llama_or_gemma_folder_loads_by_its_config(tiny_ckpt, tmp_path):
    """transformer-lens guesses the architecture of a path containing 'llama' or 'gemma' from its
    name; a GPT-2 checkpoint kept under such a folder must still load as what config.json says."""
    want = models.load_model(str(tiny_ckpt), CPU, torch.float32).meta["weights_fingerprint"]
    for parent in ["llama-study", "gemma-runs"]:
        ckpt = shutil.copytree(tiny_ckpt, tmp_path / parent / "tiny-gpt2")
        lm = models.load_model(str(ckpt), CPU, torch.float32)
        assert lm.name == lm.model.cfg.model_name == "tiny-gpt2"
        assert lm.meta["architecture"] == "GPT2LMHeadModel" and lm.meta["weights_fingerprint"] == want


def test_unreadable_dataset_and_model_paths_are_one_line(tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command without root's permission override")
    (tmp_path / "locked").mkdir()
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "some text"}) + "\n")
    (tmp_path / "texts.jsonl").chmod(0)
    (tmp_path / "locked").chmod(0)
    code = (
        "import sys, torch\n"
        "from saekit import models, texts\n"
        "from saekit.errors import SaekitError\n"
        f"for load in [lambda: texts.load_texts({str(tmp_path / 'texts.jsonl')!r}),\n"
        f"             lambda: texts.load_texts({str(tmp_path / 'locked' / 'texts.jsonl')!r}),\n"
        f"             lambda: models.load_model({str(tmp_path / 'locked' / 'ckpt')!r}, torch.device('cpu'), torch.float32)]:\n"
        "    try:\n"
        "        load()\n"
        "    except SaekitError as e:\n"
        "        print(e)\n"
    )
    try:
        r = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code],
            env=CLI_ENV,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"--dataset {tmp_path / 'texts.jsonl'} cannot be read (Permission denied): check its permissions",
        f"--dataset {tmp_path / 'locked' / 'texts.jsonl'} cannot be read (Permission denied): check its permissions",
        f"--model {tmp_path / 'locked' / 'ckpt'} cannot be read (Permission denied): check its permissions",
    ]

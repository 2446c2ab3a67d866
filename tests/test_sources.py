"""Harvest inputs: packing, local text formats, model loading (local HF checkpoint with no network,
name and hook errors), and the shipped embedded model, tokenizer and corpus."""

import json
import socket
import sys

import pytest
import torch

from saekit import embedded
from saekit import sources as S
from saekit.errors import SaekitError

CPU = torch.device("cpu")


def make_tiny_gpt2(out, n_ctx: int = 64, seed: int = 0):
    """A tiny GPT-2 (random weights) + a byte-level BPE tokenizer trained offline, saved HF-style."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders find features in activations."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    # n_ctx mirrors the hub's gpt2 config.json, which carries it beside n_positions.
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_ctx, n_ctx=n_ctx, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
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
    p = S.Packing(ctx_len=5, bos_id=99, sep_id=0)
    seqs = list(S.pack(docs, p))
    assert all(len(s) == 5 and s[0] == 99 for s in seqs)
    stream = [t for s in seqs for t in s[1:]]
    expected = [t for d in docs for t in (*d, 0)]
    # every token of every document, in order, separators between; only a tail < one sequence is left
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 4


def test_pack_without_bos():
    seqs = list(S.pack([[1, 2, 3, 4, 5, 6, 7]], S.Packing(3, None, None)))
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
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(str(tmp_path / "saved_dict"))
    for spec, kw in [("d.jsonl", {}), ("d.parquet", {}), ("saved", {}), ("saved_dict", {"split": "test"})]:
        src = S.load_texts(str(tmp_path / spec), text_column="body", **kw)
        assert list(src.docs()) == docs, spec
        assert list(src.docs()) == docs, f"{spec}: a second pass must give the same documents"
    (tmp_path / "book.txt").write_text("line one\n\nline two\n")
    assert list(S.load_texts(str(tmp_path / "book.txt")).docs()) == ["line one\n\nline two\n"]


def test_text_errors_name_the_fix(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SaekitError, match="no column 'text'.*body.*--text-column"):
        list(S.load_texts(str(tmp_path / "d.jsonl")).docs())
    with pytest.raises(SaekitError, match="no such file"):
        S.load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(SaekitError, match="unsupported file type"):
        S.load_texts(str(tmp_path / "d.csv"))


def test_in_memory_dataset_identity_tracks_content():
    import datasets

    a = datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).to_iterable_dataset()
    b = datasets.Dataset.from_dict({"text": ["alpha", "gamma"]}).to_iterable_dataset()
    ma, mb = S.dataset_source(a).meta, S.dataset_source(b).meta
    assert ma["head_sha256"] != mb["head_sha256"]
    assert S.dataset_source(a).meta == ma  # stable
    assert list(S.dataset_source(a).docs()) == ["alpha", "beta"]


# -- models and hooks -----------------------------------------------------------------------------


def test_local_checkpoint_loads_offline_and_matches_hf(tiny_ckpt, no_network):
    from transformers import GPT2LMHeadModel

    lm = S.load_model(str(tiny_ckpt), CPU, torch.float32)
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
        S.load_model("gpt2-smal", CPU, torch.float32)


def test_unknown_hook_lists_closest(tiny_ckpt):
    model = S.load_model(str(tiny_ckpt), CPU, torch.float32).model
    with pytest.raises(SaekitError, match=r"unknown hook 'blocks.1.hook_resid_pr'.*closest: blocks.1.hook_resid_pre"):
        S.resolve_hooks(model, ["blocks.1.hook_resid_pr"])
    with pytest.raises(SaekitError, match="not a per-token activation"):
        S.resolve_hooks(model, ["blocks.0.attn.hook_pattern"])
    specs = S.resolve_hooks(model, ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
    assert [(h.d, h.layer) for h in specs] == [(32, 1), (32, 0)]  # hook_z: heads * d_head flattened
    assert S.stop_layer(specs, 2) == 2
    assert S.stop_layer(S.resolve_hooks(model, ["ln_final.hook_normalized"]), 2) is None


def test_device_and_dtype_defaults():
    assert S.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert S.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert S.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SaekitError, match="--dtype"):
        S.resolve_dtype("int8", CPU)


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
        loss, cache = model.run_with_cache(torch.tensor(seqs), return_type="loss", names_filter="blocks.2.hook_resid_pre")
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
    seqs = list(S.pack(S.tokenize_docs(model.tokenizer, docs[-40:]), S.model_packing(model, 128)))[:16]
    loss, spread, bos = _structure(model, seqs)
    r_loss, r_spread, r_bos = _structure(random_init, seqs)
    assert loss < 2.5 < r_loss  # nats per byte; uniform over 257 tokens would be 5.55
    assert bos > r_bos + 0.5
    assert spread > r_spread


def test_embedded_training_is_reproducible(tmp_path):
    cfg = embedded.TrainEmbeddedConfig(steps=2, batch_size=2, warmup=1)
    a = embedded.train(cfg, out=tmp_path / "a.safetensors")
    b = embedded.train(cfg, out=tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a["corpus_sha256"] == b["corpus_sha256"]


def test_corpus_regenerates_identically_on_the_same_python(tmp_path):
    from safetensors import safe_open

    with safe_open(str(embedded.WEIGHTS_PATH), "pt") as f:
        trained_on = json.loads(f.metadata()["saekit"])["python"]
    if sys.version.split()[0] != trained_on:
        pytest.skip(f"the shipped corpus comes from Python {trained_on}'s docs")
    embedded.write_corpus(tmp_path / "corpus.jsonl")
    assert (tmp_path / "corpus.jsonl").read_bytes() == embedded.CORPUS_PATH.read_bytes()

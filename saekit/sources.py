"""Where harvest's inputs come from: a model (transformer-lens name, local HF checkpoint, the
embedded default), texts (HF hub dataset, local files, the embedded corpus), and how texts become
fixed-length token sequences.

Every source carries a `meta` dict (its provenance, stored in the cache's metadata) and a short
`name` (used in the default output path). Text sources are re-iterable: `docs()` starts a fresh
pass over the documents each call, which is what resume and multi-rank harvests rely on.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import hashlib
import json
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saekit import embedded
from saekit.devices import dtype_name
from saekit.errors import SaekitError, one_line

EMBEDDED = "embedded"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    """A HookedTransformer plus what identifies it."""

    model: Any
    """transformer_lens.HookedTransformer, in eval mode, on the requested device and dtype."""
    name: str
    """Short name for paths and logs ('gpt2', 'saekit-embedded', a checkpoint folder's name)."""
    meta: dict
    """Provenance: source kind, name or path, transformer-lens version, dtype, weights fingerprint."""


def weights_fingerprint(model: torch.nn.Module, sample: int = 65536) -> str:
    """A cheap, stable identity for a model's weights (sha256, 16 hex chars).

    Hashes every parameter's name, shape and dtype plus up to `sample` evenly strided elements
    of it (all of them for small tensors), so it costs O(#params / stride) rather than reading
    a multi-GB model, yet changes whenever the weights do in practice (fine-tunes, other
    checkpoints, another dtype).
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        picked = flat[::step].to("cpu").contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        # bf16 has no numpy dtype: hash the raw 2-byte patterns.
        raw = picked.view(torch.int16) if picked.dtype == torch.bfloat16 else picked
        h.update(raw.numpy().tobytes())
    return h.hexdigest()[:16]


def _tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet():
    """transformer-lens 3 warns that HookedTransformer is deprecated (for TransformerBridge) on
    every load; the HookedTransformer API is what saekit and the original README build on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*HookedTransformer.*")
        yield


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load `spec`: None/'embedded', a local HF checkpoint directory, or a transformer-lens name."""
    if spec in (None, "", EMBEDDED):
        return _load_embedded(device, dtype)
    mode = _mode(Path(spec).expanduser(), "--model")
    if mode is not None and stat.S_ISDIR(mode):
        return _load_local_hf(Path(spec).expanduser().resolve(), device, dtype)
    if mode is not None and spec.lower() not in _official_names():
        raise SaekitError(f"--model {spec} is {_file_kind(mode)}, not a checkpoint folder: pass the folder holding "
                          "config.json, model.safetensors and the tokenizer (or a transformer-lens name)")
    return _load_tl_name(spec, device, dtype)


def _mode(path: Path, flag: str) -> int | None:
    """`path`'s st_mode (following links), None when nothing is there; unreadable is an error."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SaekitError(f"{flag} {path} cannot be read ({e.strerror or e}): check its permissions") from e


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")]
    return next((name for test, name in kinds if test(mode)), "not a file")


def describe_model(model, name: str, meta: dict) -> LoadedModel:
    """`model` as it is (not even put in eval mode: it may be the caller's) with its provenance:
    `meta` plus transformer-lens version, dtype, shape and weights fingerprint."""
    meta = {**meta, "transformer_lens_version": _tl_version(), "dtype": dtype_name(model.cfg.dtype),
            "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "n_ctx": model.cfg.n_ctx,
            "weights_fingerprint": weights_fingerprint(model)}
    return LoadedModel(model, name, meta)


def _finish(model, name: str, meta: dict) -> LoadedModel:
    model.eval()
    return describe_model(model, name, meta)


def _load_embedded(device, dtype) -> LoadedModel:
    model = embedded.load_embedded_model(device, dtype)
    return _finish(model, embedded.MODEL_NAME, {"source": "embedded", "name": embedded.MODEL_NAME})


def _official_names() -> dict[str, str]:
    """lower-cased name or alias -> official transformer-lens name."""
    from transformer_lens import loading_from_pretrained as loading

    return loading.make_model_alias_map()


def _load_tl_name(spec: str, device, dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer

    names = _official_names()
    official = names.get(spec.lower())
    if official is None:
        close = difflib.get_close_matches(spec.lower(), list(names), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise SaekitError(
            f"unknown model '{spec}': not a transformer-lens model name nor a local checkpoint "
            f"directory{hint} (or use --model embedded)"
        )
    try:
        with _quiet():
            # Exactly what a user online would write; the weights come from the HF hub (or its cache).
            model = HookedTransformer.from_pretrained(spec, device=str(device), dtype=dtype)
    except (OSError, ConnectionError, ValueError) as e:
        raise SaekitError(
            f"could not load model '{spec}' from the Hugging Face hub ({one_line(e, 100)}): "
            "check the network, or pass a local checkpoint directory with --model"
        ) from e
    return _finish(model, official.split("/")[-1], {"source": "transformer_lens", "name": official})


def _load_local_hf(path: Path, device, dtype) -> LoadedModel:
    """A `save_pretrained` checkpoint directory (+ its tokenizer), loaded with no network access.

    Mirrors HookedTransformer.from_pretrained (same config conversion, weight conversion and
    processing: fold_ln, centered writing weights and unembed) but reads only `path`.
    """
    _check_checkpoint(path)
    try:
        with _quiet():
            model = _convert_local_hf(path, device, dtype)
    except SaekitError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, AttributeError, TypeError) as e:
        # transformer-lens's converters fail on configs they do not know with any of these
        raise SaekitError(f"could not load the checkpoint in {path} ({one_line(e, 100)}): transformer-lens supports GPT-2-style save_pretrained checkpoints") from e
    cfg_sha = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return _finish(model, path.name, {"source": "hf_local", "path": str(path), "config_sha256": cfg_sha,
                                      "architecture": model.cfg.original_architecture})


# Files that carry a tokenizer's vocabulary; without one, AutoTokenizer builds an empty tokenizer
# from tokenizer_config.json alone and every text becomes unknown tokens.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_checkpoint(path: Path) -> None:
    """Refuse, one line each, what from_pretrained would fail on with a traceback or load wrongly."""
    config = path / "config.json"
    if not config.exists():
        raise SaekitError(f"--model {path} is a directory without config.json: pass a save_pretrained checkpoint")
    try:
        cfg = json.loads(config.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
        raise SaekitError(f"{config} is not JSON ({one_line(e, 60)}): save the checkpoint again with save_pretrained") from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise SaekitError(f"{config} has no model_type: it is not a transformers config; save the checkpoint with save_pretrained")
    if cfg["model_type"] == "gpt2" and "n_ctx" not in cfg:
        raise SaekitError(f"{config} has no n_ctx, which transformer-lens reads for GPT-2 (the hub's gpt2 config carries it): "
                          f"add \"n_ctx\": {cfg.get('n_positions', 1024)} (its n_positions) to it")
    _check_weights(path)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise SaekitError(f"--model {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
                          f"save the model's tokenizer beside it with tokenizer.save_pretrained('{path}')")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; pickled weights are refused, never opened."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return [path / name for name in sorted(set(json.loads(index.read_bytes())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SaekitError(f"{index} is damaged ({one_line(e, 60)}): save the checkpoint again with save_pretrained") from e
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise SaekitError(f"saekit loads only safetensors weights, and {path} holds pickled ones ({', '.join(pickles)}), "
                          "which can run code when loaded: re-save them with "
                          "model.save_pretrained(folder, safe_serialization=True)")
    raise SaekitError(f"--model {path} has no model.safetensors: save the model there with save_pretrained")


def _check_weights(path: Path) -> None:
    """Open each weights file's header: a file cut short or overwritten fails here, by name."""
    from safetensors import SafetensorError, safe_open

    for f in _weight_files(path):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SaekitError(f"weights file {f} is damaged or missing ({one_line(e, 80)}): "
                              "copy the checkpoint again or re-save it with save_pretrained") from e


def _tl_config(path: Path, hf_model, device, dtype):
    """transformer-lens's config for a local checkpoint, read through a neutral name.

    transformer-lens takes the architecture of any path containing "llama" or "gemma" from the
    name instead of config.json (and then fails), so a GPT-2 in /data/llama-study/ckpt would not
    load; a link named `checkpoint` shows it the folder without its path.
    """
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoint"
        link.symlink_to(path, target_is_directory=True)
        cfg = loading.get_pretrained_model_config(
            str(link), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device=str(device), dtype=dtype,
            local_files_only=True,
        )
    cfg.model_name, cfg.tokenizer_name = path.name, str(path)
    return cfg


def _convert_local_hf(path: Path, device, dtype):
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # use_safetensors: never fall back to a pickled pytorch_model.bin lying beside the safetensors.
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SaekitError(f"checkpoint {path} has no usable tokenizer ({one_line(e, 80)}): save one beside it with tokenizer.save_pretrained") from e
    cfg = _tl_config(path, hf_model, device, dtype)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    model.move_model_modules_to_device()
    return model


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


class HookSpec(NamedTuple):
    name: str
    """Full hook name, e.g. 'blocks.2.hook_resid_pre'."""
    d: int
    """Features per token (trailing dims flattened, e.g. n_heads * d_head for hook_z)."""
    layer: int
    """Block index the hook lives in; -1 before the first block, n_layers after the last."""


def default_hook(model) -> str:
    """The middle layer's residual stream: `blocks.{n_layers // 2}.hook_resid_pre`."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


def _hook_layer(name: str, n_layers: int) -> int:
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    return -1 if name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")) else n_layers


def stop_layer(hooks: list[HookSpec], n_layers: int) -> int | None:
    """`stop_at_layer` for a forward pass that still reaches every hook (None: run it all)."""
    last = max(h.layer for h in hooks)
    return None if last >= n_layers else last + 1


def resolve_hooks(model, names: list[str]) -> list[HookSpec]:
    """Validate hook names against the model and measure each one's width with a 2-token pass.

    Only per-token hooks ([batch, pos, ...]) can be cached; attention patterns ([batch, head,
    q, k]) are refused.
    """
    valid = list(model.hook_dict)
    for n in names:
        if n not in model.hook_dict:
            close = difflib.get_close_matches(n, valid, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {default_hook(model)}"
            raise SaekitError(f"unknown hook '{n}' for model {model.cfg.model_name}; {hint}")
    if len(set(names)) != len(names):
        raise SaekitError(f"--hook lists a hook twice: {names}")
    shapes: dict[str, tuple] = {}

    def grab(act, hook):
        shapes[hook.name] = tuple(act.shape)

    toks = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        model.run_with_hooks(toks, fwd_hooks=[(n, grab) for n in names], return_type=None)
    specs = []
    for n in names:
        s = shapes[n]
        if len(s) < 3 or s[:2] != (1, 2) or n.endswith(("hook_pattern", "hook_attn_scores")):
            raise SaekitError(f"hook '{n}' is not a per-token activation (shape {list(s)}): pick a hook_resid_*, hook_mlp_out, hook_z, ...")
        d = 1
        for x in s[2:]:
            d *= x
        specs.append(HookSpec(n, d, _hook_layer(n, model.cfg.n_layers)))
    return specs


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------


class TextSource(NamedTuple):
    """A re-iterable stream of documents."""

    docs: Callable[[], Iterator[str]]
    """Starts a fresh pass over the documents (strings), in a fixed order."""
    name: str
    """Short name for paths and logs."""
    meta: dict
    """Provenance: kind, name or path, config, split, text column, and a content fingerprint."""


def _column(rows: Iterable[dict], column: str, where: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise SaekitError(
                f"{where} has no column '{column}' (columns: {', '.join(sorted(row))}): pass --text-column"
            )
        text = row[column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise SaekitError(f"{where} column '{column}' holds {type(text).__name__}, not text: pass --text-column")
        yield text


def _file_sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with _opened(p) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _opened(path: Path):
    """`path` open for reading in binary; an unreadable file is a one-line error."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise SaekitError(f"--dataset {path} cannot be read ({e.strerror or e}): check its permissions") from e


def _utf8_text_sha(path: Path) -> str:
    """sha256 of a .txt/.jsonl file, refusing it unless it is UTF-8 text throughout.

    Local files are checked whole, before any store exists: a harvest stopped half-way by bad
    input leaves a store that cannot be resumed once the file is repaired (it hashes differently),
    and with --overwrite the old store would already be gone. Even one bad byte is refused: in a
    Latin-1 file only the accented letters are invalid UTF-8, so a tolerance for "a few" would let
    whole files through wrongly.
    """
    h = hashlib.sha256()
    dec = codecs.getincrementaldecoder("utf-8")()
    pos = lines = 0  # bytes and newlines before `block`
    with _opened(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            nul = block.find(b"\0")
            bad = _undecodable(dec, block, pos)
            if nul >= 0 and (bad is None or pos + nul < bad[0]):
                raise _not_text(path, pos + nul, lines + block.count(b"\n", 0, nul), None)
            if bad is not None:
                raise _not_text(path, bad[0], lines + block.count(b"\n", 0, max(0, bad[0] - pos)), bad[1])
            pos, lines = pos + len(block), lines + block.count(b"\n")
        bad = _undecodable(dec, b"", pos, final=True)  # a multi-byte character cut off at the end
        if bad is not None:
            raise _not_text(path, bad[0], lines, bad[1])
    return h.hexdigest()[:16]


def _undecodable(dec, block: bytes, pos: int, final: bool = False) -> tuple[int, int] | None:
    """(file offset, value) of the first invalid byte when `dec` decodes `block`, else None."""
    pending = len(dec.getstate()[0])  # bytes of a character begun in the previous block
    try:
        dec.decode(block, final)
    except UnicodeDecodeError as e:
        return pos - pending + e.start, e.object[e.start]
    return None


def _not_text(path: Path, offset: int, newlines: int, byte: int | None) -> SaekitError:
    """The error for a NUL (`byte` None) or an invalid UTF-8 byte at `offset` of `path`."""
    where = f"at offset {offset} (line {newlines + 1})"
    with open(path, "rb") as f:
        utf16 = f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    if byte is None:
        return SaekitError(f"--dataset {path} holds a NUL byte {where}: it is binary (or UTF-16), not UTF-8 text; "
                           "pass a text file")
    guess = "it looks like UTF-16 and " if utf16 else ""
    return SaekitError(f"--dataset {path} is not UTF-8 text: byte 0x{byte:02x} {where} is invalid; {guess}saekit "
                       f"reads UTF-8 only: convert it, e.g. `iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8 "
                       f"{path.name} > {path.stem}.utf8{path.suffix}`")


def load_texts(spec: str | None, *, config: str | None = None, split: str = "train",
               text_column: str = "text") -> TextSource:
    """`spec`: None/'embedded', a .txt/.jsonl/.parquet file, a `save_to_disk` directory, or an HF
    hub dataset name (streamed, never downloaded whole)."""
    if spec in (None, "", EMBEDDED):
        src = _jsonl_source(embedded.CORPUS_PATH, "text")
        # No path: the same corpus must give the same store wherever saekit is installed.
        return src._replace(name="embedded", meta={"source": "embedded", "sha256": src.meta["sha256"]})
    path = Path(spec).expanduser()
    mode = _mode(path, "--dataset")
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Known by stat alone: /dev/zero never ends and opening a FIFO waits for a writer.
        raise SaekitError(f"--dataset {spec} is {_file_kind(mode)}, not a regular file: "
                          "pass a .txt, .jsonl or .parquet file or a save_to_disk folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _txt_source(path)
        if suffix in (".jsonl", ".json"):
            return _jsonl_source(path, text_column)
        if suffix == ".parquet":
            return _parquet_source(path, text_column)
        raise SaekitError(f"--dataset {path}: unsupported file type '{suffix}': use .txt, .jsonl or .parquet")
    if path.is_dir():
        return _disk_source(path, split, text_column)
    if spec.endswith((".txt", ".jsonl", ".json", ".parquet")) or spec.startswith((".", "/", "~")):
        raise SaekitError(f"--dataset {spec}: no such file or directory")
    return _hub_source(spec, config, split, text_column)


def _txt_source(path: Path) -> TextSource:
    # A plain text file is one document: cutting it into lines or paragraphs would insert
    # end-of-text separators the author never wrote. A leading byte-order mark is not text.
    def docs() -> Iterator[str]:
        yield path.read_text(encoding="utf-8-sig")

    meta = {"source": "txt", "path": str(path.resolve()), "sha256": _utf8_text_sha(path)}
    return TextSource(docs, path.stem, meta)


_JSON_KINDS = [(bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (type(None), "null")]


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaekitError(f"{path} line {i} is not JSON ({one_line(e, 60)}): "
                                  'each line must be one JSON object, e.g. {"text": "..."}') from e
            if not isinstance(row, dict):
                kind = next(name for t, name in _JSON_KINDS if isinstance(row, t))
                raise SaekitError(f"{path} line {i} is a JSON {kind}, not an object: "
                                  'each line must be one JSON object, e.g. {"text": "..."}')
            yield row


def _jsonl_source(path: Path, column: str) -> TextSource:
    meta = {"source": "jsonl", "path": str(path.resolve()), "text_column": column, "sha256": _utf8_text_sha(path)}
    for _ in _column(_jsonl_rows(path), column, str(path)):  # every line, before any store exists
        pass
    return TextSource(lambda: _column(_jsonl_rows(path), column, str(path)), path.stem, meta)


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SaekitError(f"--dataset {path} is not a readable Parquet file ({one_line(e, 80)}): "
                          "pass an intact .parquet file, or the texts as .jsonl or .txt") from e


def _parquet_source(path: Path, column: str) -> TextSource:
    import pyarrow as pa

    sha = _file_sha([path])  # first: an unreadable file is a permissions problem, not a Parquet one
    schema = _parquet_file(path).schema_arrow
    if column not in schema.names:
        raise SaekitError(f"{path} has no column '{column}' (columns: {', '.join(schema.names)}): pass --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise SaekitError(f"{path} column '{column}' holds {kind}, not text: pass --text-column")

    def batches() -> Iterator:
        n = 0
        try:
            for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=[column]):
                yield batch
                n += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise SaekitError(f"--dataset {path} is damaged past row {n} ({one_line(e, 80)}): "
                              "pass an intact copy") from e

    def docs() -> Iterator[str]:
        for batch in batches():
            yield from _column(({column: t} for t in batch.column(0).to_pylist()), column, str(path))

    for _ in batches():  # decode every row group once, before any store exists
        pass
    meta = {"source": "parquet", "path": str(path.resolve()), "text_column": column, "sha256": sha}
    return TextSource(docs, path.stem, meta)


def _load_saved(path: Path):
    """`datasets.load_from_disk`, with what can go wrong in one line."""
    import datasets
    import pyarrow as pa

    saved = (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    try:
        return datasets.load_from_disk(str(path))
    except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as e:  # OSError: a file is missing
        if not saved:
            raise SaekitError(f"--dataset {path} is a directory but not a datasets save_to_disk folder "
                              "(no state.json or dataset_dict.json): pass such a folder or a .txt/.jsonl/.parquet file") from e
        raise SaekitError(f"--dataset {path} is a damaged save_to_disk folder ({one_line(e, 80)}): "
                          "save the dataset there again") from e


def _disk_source(path: Path, split: str, column: str) -> TextSource:
    import datasets

    ds = _load_saved(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SaekitError(f"{path} has no split '{split}' (splits: {', '.join(ds)}): pass --split")
        ds = ds[split]
    if column not in ds.column_names:
        raise SaekitError(f"{path} has no column '{column}' (columns: {', '.join(ds.column_names)}): pass --text-column")
    meta = {"source": "save_to_disk", "path": str(path.resolve()), "split": split, "text_column": column,
            "fingerprint": ds._fingerprint}
    return TextSource(lambda: _column(ds.select_columns([column]), column, str(path)), path.name, meta)


def _hub_source(name: str, config: str | None, split: str, column: str) -> TextSource:
    from datasets import load_dataset

    try:
        # Exactly what a user online would write: a streamed dataset, read as it is consumed.
        ds = load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, network, config) here
        raise SaekitError(
            f"dataset '{name}' could not be opened ({one_line(e, 100)}): check the name, --dataset-config, "
            "--split and the network, or pass a local .txt/.jsonl/.parquet file or a save_to_disk folder"
        ) from e
    return dataset_source(ds, column, name=name, split=split, config=config)


def dataset_source(ds, column: str = "text", *, name: str | None = None, split: str | None = None,
                   config: str | None = None) -> TextSource:
    """A TextSource over an HF `Dataset` or `IterableDataset` object (the original README passes one).

    Identity (for provenance and the cache key): dataset name, config, split and version from
    `ds.info`, the `Dataset._fingerprint` when there is one, and — because a streamed dataset has
    no content fingerprint — the sha256 of its first 16 documents.
    """
    info = getattr(ds, "info", None)
    name = name or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset"
    config = config or getattr(info, "config_name", None)
    split = split or (str(ds.split) if getattr(ds, "split", None) is not None else None)
    cols = getattr(ds, "column_names", None)
    if cols is not None and column not in cols:
        raise SaekitError(f"dataset '{name}' has no column '{column}' (columns: {', '.join(cols)}): pass --text-column")

    def docs() -> Iterator[str]:
        return _column(iter(ds), column, f"dataset '{name}'")

    head = hashlib.sha256()
    for i, text in enumerate(docs()):
        if i == 16:
            break
        head.update(text.encode("utf-8", "replace") + b"\0")
    meta = {"source": "hf_dataset", "name": name, "config": config, "split": split, "text_column": column,
            "version": str(getattr(info, "version", None) or ""), "fingerprint": getattr(ds, "_fingerprint", None),
            "head_sha256": head.hexdigest()[:16]}
    return TextSource(docs, name.split("/")[-1], meta)


# ---------------------------------------------------------------------------------------------
# Tokenize and pack
# ---------------------------------------------------------------------------------------------


class Packing(NamedTuple):
    """How documents become sequences; recorded in the store's metadata."""

    ctx_len: int
    """Tokens per sequence, BOS included."""
    bos_id: int | None
    """Token placed at position 0 of every sequence (None: the model takes no BOS)."""
    sep_id: int | None
    """Token appended after every document (GPT-2: <|endoftext|>, the same id as BOS)."""


def model_packing(model, ctx_len: int) -> Packing:
    """BOS and separator as the model expects: BOS when `cfg.default_prepend_bos`, EOS between docs."""
    tok = model.tokenizer
    if tok is None:
        raise SaekitError(f"model {model.cfg.model_name} has no tokenizer: load a checkpoint that ships one")
    if ctx_len > model.cfg.n_ctx:
        raise SaekitError(f"--ctx-len {ctx_len} is above the model's n_ctx {model.cfg.n_ctx}: use --ctx-len {model.cfg.n_ctx} or less")
    if ctx_len < 2:
        raise SaekitError(f"--ctx-len {ctx_len} is too short: use at least 2")
    bos = tok.bos_token_id if model.cfg.default_prepend_bos else None
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    return Packing(ctx_len, bos, sep)


def tokenize_docs(tokenizer, docs: Iterable[str], batch: int = 64, chars: int = 32768) -> Iterator[list[int]]:
    """Token ids of each document, no special tokens (packing adds BOS/separators itself).

    Documents go to the tokenizer in groups (up to `batch` documents or `chars` characters), so a
    fast tokenizer works on many at once without reading far ahead of what the model needs.
    """
    buf: list[str] = []
    size = 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if len(buf) == batch or size >= chars:
            yield from tokenizer(buf, add_special_tokens=False)["input_ids"]
            buf, size = [], 0
    if buf:
        yield from tokenizer(buf, add_special_tokens=False)["input_ids"]


def pack(token_docs: Iterable[list[int]], p: Packing) -> Iterator[list[int]]:
    """Concatenate documents (each followed by `sep_id`) and cut the stream into sequences of
    exactly `ctx_len` tokens, each starting with `bos_id`. Short documents share a sequence;
    long ones continue into the next. Only the final tail shorter than a sequence is left over.
    """
    body = p.ctx_len - (1 if p.bos_id is not None else 0)
    head = [p.bos_id] if p.bos_id is not None else []
    buf: list[int] = []
    pos = 0
    for ids in token_docs:
        buf.extend(ids)
        if p.sep_id is not None:
            buf.append(p.sep_id)
        while len(buf) - pos >= body:
            yield head + buf[pos : pos + body]
            pos += body
        if pos > 1 << 16:  # drop consumed tokens now and then, not on every sequence
            del buf[:pos]
            pos = 0


def sequences(model, texts: TextSource, ctx_len: int) -> Iterator[list[int]]:
    """All full sequences of `texts` for `model`, in order: `[ctx_len]` token-id lists, documents
    tokenized (`tokenize_docs`) and packed (`pack`) as `model_packing` says. The one path from
    texts to sequences; harvest and its checks read the texts through it."""
    return pack(tokenize_docs(model.tokenizer, texts.docs()), model_packing(model, ctx_len))


def default_store_name(model_name: str, hooks: list[str], texts_name: str) -> str:
    """`<model>__<hook>[+<hook>...]__<dataset>` with path-unsafe characters replaced."""
    raw = f"{model_name}__{'+'.join(hooks)}__{texts_name}"
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", raw)

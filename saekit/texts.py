"""The texts harvest reads (an HF hub dataset, local .txt/.jsonl/.parquet files, a save_to_disk
folder, or the embedded corpus) and how they become fixed-length token sequences.

Every source carries a `meta` dict (its provenance, stored in the cache's metadata) and a short
`name` (used in the default output path). Text sources are re-iterable: `docs()` starts a fresh
pass over the documents each call, which is what resume and multi-rank harvests rely on.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from saekit import embedded
from saekit.embedded import EMBEDDED
from saekit.errors import SaekitError, file_kind, one_line, path_mode

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
        return SaekitError(
            f"--dataset {path} holds a NUL byte {where}: it is binary (or UTF-16), not UTF-8 text; pass a text file"
        )
    guess = "it looks like UTF-16 and " if utf16 else ""
    return SaekitError(
        f"--dataset {path} is not UTF-8 text: byte 0x{byte:02x} {where} is invalid; {guess}saekit "
        f"reads UTF-8 only: convert it, e.g. `iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8 "
        f"{path.name} > {path.stem}.utf8{path.suffix}`"
    )


def load_texts(
    spec: str | None, *, config: str | None = None, split: str = "train", text_column: str = "text"
) -> TextSource:
    """`spec`: None/'embedded', a .txt/.jsonl/.parquet file, a `save_to_disk` directory, or an HF
    hub dataset name (streamed, never downloaded whole)."""
    if spec in (None, "", EMBEDDED):
        src = _jsonl_source(embedded.CORPUS_PATH, "text")
        # No path: the same corpus must give the same store wherever saekit is installed.
        return src._replace(name="embedded", meta={"source": "embedded", "sha256": src.meta["sha256"]})
    path = Path(spec).expanduser()
    mode = path_mode(path, "--dataset")
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Known by stat alone: /dev/zero never ends and opening a FIFO waits for a writer.
        raise SaekitError(
            f"--dataset {spec} is {file_kind(mode)}, not a regular file: "
            "pass a .txt, .jsonl or .parquet file or a save_to_disk folder"
        )
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
                raise SaekitError(
                    f"{path} line {i} is not JSON ({one_line(e, 60)}): "
                    'each line must be one JSON object, e.g. {"text": "..."}'
                ) from e
            if not isinstance(row, dict):
                kind = next(name for t, name in _JSON_KINDS if isinstance(row, t))
                raise SaekitError(
                    f"{path} line {i} is a JSON {kind}, not an object: "
                    'each line must be one JSON object, e.g. {"text": "..."}'
                )
            yield row


def _jsonl_source(path: Path, column: str) -> TextSource:
    meta = {"source": "jsonl", "path": str(path.resolve()), "text_column": column, "sha256": _utf8_text_sha(path)}
    for _ in _column(_jsonl_rows(path), column, str(path)):  # every line, before any store exists
        pass
    return TextSource(lambda: _column(_jsonl_rows(path), column, str(path)), path.stem, meta)


def _parquet_file(path: Path):
    import pyarrow as pa  # lazy: only .parquet and save_to_disk texts need it
    import pyarrow.parquet as pq  # lazy: as pyarrow

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SaekitError(
            f"--dataset {path} is not a readable Parquet file ({one_line(e, 80)}): "
            "pass an intact .parquet file, or the texts as .jsonl or .txt"
        ) from e


def _parquet_source(path: Path, column: str) -> TextSource:
    import pyarrow as pa  # lazy: only .parquet texts need it

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
            raise SaekitError(
                f"--dataset {path} is damaged past row {n} ({one_line(e, 80)}): pass an intact copy"
            ) from e

    def docs() -> Iterator[str]:
        for batch in batches():
            yield from _column(({column: t} for t in batch.column(0).to_pylist()), column, str(path))

    for _ in batches():  # decode every row group once, before any store exists
        pass
    meta = {"source": "parquet", "path": str(path.resolve()), "text_column": column, "sha256": sha}
    return TextSource(docs, path.stem, meta)


def _load_saved(path: Path):
    """`datasets.load_from_disk`, with what can go wrong in one line."""
    import datasets  # lazy: datasets takes seconds to import
    import pyarrow as pa  # lazy: as datasets

    saved = (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    try:
        return datasets.load_from_disk(str(path))
    except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as e:  # OSError: a file is missing
        if not saved:
            raise SaekitError(
                f"--dataset {path} is a directory but not a datasets save_to_disk folder "
                "(no state.json or dataset_dict.json): pass such a folder or a .txt/.jsonl/.parquet file"
            ) from e
        raise SaekitError(
            f"--dataset {path} is a damaged save_to_disk folder ({one_line(e, 80)}): save the dataset there again"
        ) from e


def _disk_source(path: Path, split: str, column: str) -> TextSource:
    import datasets  # lazy: datasets takes seconds to import

    ds: Any = _load_saved(path)  # a Dataset, or a DatasetDict of them
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SaekitError(f"{path} has no split '{split}' (splits: {', '.join(map(str, ds))}): pass --split")
        ds = ds[split]
    if column not in ds.column_names:
        raise SaekitError(
            f"{path} has no column '{column}' (columns: {', '.join(ds.column_names)}): pass --text-column"
        )
    meta = {
        "source": "save_to_disk",
        "path": str(path.resolve()),
        "split": split,
        "text_column": column,
        "fingerprint": ds._fingerprint,
    }
    return TextSource(lambda: _column(ds.select_columns([column]), column, str(path)), path.name, meta)


def _hub_source(name: str, config: str | None, split: str, column: str) -> TextSource:
    from datasets import load_dataset  # lazy: datasets takes seconds to import

    try:
        # Exactly what a user online would write: a streamed dataset, read as it is consumed.
        ds = load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, network, config) here
        raise SaekitError(
            f"dataset '{name}' could not be opened ({one_line(e, 100)}): check the name, --dataset-config, "
            "--split and the network, or pass a local .txt/.jsonl/.parquet file or a save_to_disk folder"
        ) from e
    return dataset_source(ds, column, name=name, split=split, config=config)


def dataset_source(
    ds, column: str = "text", *, name: str | None = None, split: str | None = None, config: str | None = None
) -> TextSource:
    """A TextSource over an HF `Dataset` or `IterableDataset` object (the original README passes one).

    Identity (for provenance and the cache key): dataset name, config, split and version from
    `ds.info`, the `Dataset._fingerprint` when there is one, and — because a streamed dataset has
    no content fingerprint — the sha256 of its first 16 documents.
    """
    info = getattr(ds, "info", None)
    name = str(name or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset")
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
    meta = {
        "source": "hf_dataset",
        "name": name,
        "config": config,
        "split": split,
        "text_column": column,
        "version": str(getattr(info, "version", None) or ""),
        "fingerprint": getattr(ds, "_fingerprint", None),
        "head_sha256": head.hexdigest()[:16],
    }
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
        raise SaekitError(
            f"--ctx-len {ctx_len} is above the model's n_ctx {model.cfg.n_ctx}: use --ctx-len {model.cfg.n_ctx} or less"
        )
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

"""The activation cache: a Zarr v3 group of bf16 activations, token ids and positions.

Layout of a store (see docs/cache.md):

    <store>/zarr.json            group; attributes hold format, provenance (`meta`), hooks, layout,
                                 statistics, per-shard checksums, content hash, completeness
    <store>/acts/<hook>          [n_rows, d_model] uint16 = bf16 bit patterns, sharded, uncompressed
    <store>/tokens               [n_rows] int32 token id of every row
    <store>/positions            [n_rows] int32 position of every row in its sequence
    <store>/.saekit-shards/      per-shard completion records while writing (gathered at finalize)

Writers fill whole shards (one zarr write per shard) and, after a shard's data, atomically write
a small JSON record with its checksums and statistics. A shard without a record is redone on
resume, so a killed writer never leaves a shard that looks complete. Rank r of w writers owns
shards i with i % w == r, so separate processes never touch the same file.

Readers memory-map each shard file after validating zarr's shard index (contiguous C-order inner
chunks, no compression) and fall back to zarr reads of whole shards (a small cache) when that check
fails or the store is an fsspec URL. Every path checks a shard's crc32c against its record the first
time it is touched, and a missing shard file is an error, never zeros. The content hash covers the
attributes (format 2: statistics included); open_store recomputes it, so edited attributes are
refused before any reader uses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import numpy as np
import torch
from tqdm import tqdm

from saekit.errors import SaekitError

FORMAT = "saekit-activation-store"
FORMAT_VERSION = 2  # 2: the content hash covers the statistics too (format 1 stores are still read)
ACTS = "acts"
TOKENS = "tokens"
POSITIONS = "positions"
RECORDS_DIR = ".saekit-shards"
CREATING = ".saekit-creating"  # marker file: present from the start of create_store until its attributes are written
FALLBACK_CACHE_BYTES = 512 << 20  # whole shards read through zarr are kept up to this size (at least 2)
# The attributes the content hash covers, by format version.
HASHED = ("format", "format_version", "meta", "hooks", "shard_rows", "chunk_rows", "n_rows", "shards")
HASHED_SINCE_2 = ("stats",)
BF16_ATTRS = {"dtype": "bfloat16", "encoding": "bfloat16-bits-as-uint16"}
_MISSING = np.uint64(2**64 - 1)  # zarr's shard-index marker for an inner chunk never written

__all__ = [
    "ActivationStore",
    "HookStats",
    "StoreWriter",
    "bf16_bits",
    "bits_to_bf16",
    "content_hash",
    "create_store",
    "open_store",
    "read_attrs",
]


class HookStats(NamedTuple):
    """Running statistics of one hook over every row of the store."""

    mean: torch.Tensor  # [d_model] float32
    mean_sq_norm: float  # mean over rows of ||x||^2


class ShardRecord(NamedTuple):
    """What a writer knows about one finished shard (also its completion marker)."""

    index: int
    start: int  # first global row
    stop: int  # one past the last valid row
    crc: dict[str, int]  # array key -> crc32c of the valid rows' bytes
    sums: dict[str, list[float]]  # hook -> float64 sum of rows, [d_model]
    sq_norms: dict[str, float]  # hook -> float64 sum of squared row norms


class Layout(NamedTuple):
    hooks: dict[str, int]  # hook -> d_model, in store order
    shard_rows: int
    chunk_rows: int


# ---------------------------------------------------------------------------------------------
# bf16 <-> uint16 bits


def bf16_bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Round any float tensor/array to bf16 and return its bit patterns. x: [...] -> uint16 [...]."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise SaekitError(f"activations must be a float array, got dtype {x.dtype}; pass floats")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_floating_point(x):
        raise SaekitError(f"activations must be a float tensor, got dtype {x.dtype}; pass floats")
    # torch rounds to nearest-even and keeps inf/nan/-0/subnormals; the int16 view is a bit copy.
    b = x.detach().to("cpu", torch.bfloat16).contiguous()
    return b.view(torch.int16).numpy().view(np.uint16)


def bits_to_bf16(u16: np.ndarray) -> torch.Tensor:
    """View uint16 bit patterns as a torch bf16 tensor without copying. u16: [...] -> bf16 [...]."""
    return torch.from_numpy(u16).view(torch.bfloat16)


def _bits_to_f32(u16: np.ndarray) -> np.ndarray:
    """bf16 bits -> float32 values (exact: bf16 is the top half of a float32). [...] -> [...]"""
    f = np.zeros((*u16.shape, 2), np.uint16)  # little-endian: the high half is element 1
    f[..., 1] = u16
    return f.view(np.float32).reshape(u16.shape)


def _row_stats(u16: np.ndarray, block: int = 2048) -> tuple[np.ndarray, float]:
    """Sum of rows and sum of squared row norms, accumulated in float64. u16: [n, d] -> ([d], scalar).

    Blocked so memory stays small; plain numpy reductions are deterministic for the same rows, so
    resumed and multi-writer stores get the same statistics bit for bit.
    """
    n, d = u16.shape
    total = np.zeros(d, np.float64)
    sq = 0.0
    # one reused float32 buffer: low halves stay zero, high halves take each block's bf16 bits
    # (a fresh array per block costs page faults that dominate the arithmetic).
    pairs = np.zeros((min(block, n), d, 2), np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):  # nan/inf rows give nan/inf stats, knowingly
        for s in range(0, n, block):
            m = min(block, n - s)
            pairs[:m, :, 1] = u16[s : s + m]
            x = pairs[:m].view(np.float32).reshape(m, d)
            total += x.sum(axis=0, dtype=np.float64)
            # per-row norms in float32 (rel. error ~1e-7), summed in float64: much faster than all-f64.
            sq += float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))
    return total, sq


def crc32c_of(a: np.ndarray) -> int:
    """crc32c of an array's bytes (C order): the per-shard checksum."""
    return crc32c.crc32c(memoryview(np.ascontiguousarray(a)).cast("B"))


def _canonical(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SaekitError(f"store metadata must be plain JSON (str/int/float/list/dict): {e}") from e


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def write_json_atomic(path: Path, obj: Any) -> None:
    # write-temp-then-rename: a reader or a resumed writer sees the old file or the new one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def shard_key(array_key: str, ndim: int, index: int) -> str:
    """Relative path of a shard file under the store (zarr's default '/' chunk key encoding)."""
    return f"{array_key}/c/{index}" + "/0" * (ndim - 1)


def write_shard_file(file: Path, rows: np.ndarray, chunk_rows: int) -> None:
    """Write one whole shard in zarr's sharding format (what zarr writes for this layout).

    rows: [shard_rows, ...] little-endian, C-order. The file is the inner chunks back to back,
    then the index (n_inner x (offset, nbytes) uint64 LE) and the crc32c of the index (uint32 LE).
    Writing it directly skips zarr's per-chunk copies (about 3-10x faster here); the layout is
    checked byte for byte against zarr's own output in the tests. Temp + rename keeps it atomic.
    """
    n_inner = rows.shape[0] // chunk_rows
    chunk_bytes = rows.nbytes // n_inner
    index = np.empty((n_inner, 2), "<u8")
    index[:, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(chunk_bytes)
    index[:, 1] = chunk_bytes
    tail = index.tobytes()
    tail += crc32c.crc32c(tail).to_bytes(4, "little")
    file.parent.mkdir(parents=True, exist_ok=True)
    # A temp file of this shard file left by a failed or killed earlier write (its shard has no
    # record, which is why it is written again): only this shard's writer ever writes here.
    for stale in file.parent.glob(f".{file.name}.*.partial"):
        stale.unlink(missing_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        f.write(tail)
    os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------
# creating and writing


def _hook_name_ok(name: Any) -> bool:
    """True for a hook name that is one array name inside the store (never a path out of it)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith((".", "__"))


def _validate_hooks(hooks: dict[str, int]) -> dict[str, int]:
    if not hooks:
        raise SaekitError("a store needs at least one hook; pass hooks={'blocks.0.hook_resid_pre': 768}")
    out = {}
    for name, d in hooks.items():
        if not _hook_name_ok(name):
            raise SaekitError(f"hook name {name!r} cannot be a store array name; drop '/' and leading '.'/'__'")
        if int(d) <= 0:
            raise SaekitError(f"hook {name!r} has d_model={d}; it must be a positive integer")
        out[str(name)] = int(d)
    return out


def _array_keys(layout: Layout) -> list[str]:
    return [f"{ACTS}/{h}" for h in layout.hooks] + [TOKENS, POSITIONS]


def _array_spec(layout: Layout, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(row shape, stored dtype) of one array of the store."""
    if key.startswith(ACTS + "/"):
        return (layout.hooks[key[len(ACTS) + 1 :]],), np.dtype(np.uint16)
    return (), np.dtype(np.int32)


def read_attrs(path: str | os.PathLike) -> dict | None:
    """The group attributes of a saekit store at a local `path`; None if there is no zarr.json there
    or another program's. A zarr.json that cannot be parsed is damaged: a one-line error saying
    so (and what to do), never "not a store"."""
    root = Path(path)
    f = root / "zarr.json"
    try:
        doc = json.loads(f.read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except ValueError as e:  # not JSON, not UTF-8: a truncated or overwritten file
        doc = e
    except OSError as e:
        raise SaekitError(f"cannot read {f} ({e.strerror}); check its permissions") from e
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        why = "not valid JSON" if isinstance(doc, ValueError) else "not a zarr group document"
        raise SaekitError(
            f"{f} is damaged ({why}), so {root} cannot be read or recognised as a saekit store and is left as it is; "
            f"restore zarr.json from a copy, or delete {root} and harvest again"
        )
    return attrs if attrs.get("format") == FORMAT else None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    return json.dumps(v)[:40]


def _check_attrs(where: Any, attrs: dict) -> Layout:
    """Check a store's attributes for type and consistency; return its layout. A hand-edited or
    damaged zarr.json gives one line, never a traceback or a path outside the store."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SaekitError(f"store {where} has damaged attributes: {what}; restore zarr.json or re-harvest")

    v = attrs.get("format_version")
    need(_is_int(v) and v >= 1, f"format_version is {_show(v)}, not a positive integer")
    if v > FORMAT_VERSION:
        raise SaekitError(f"{where} has store format {v}; upgrade saekit to read it")
    hooks = attrs.get("hooks")
    need(isinstance(hooks, dict) and len(hooks) > 0, f"hooks is {_show(hooks)}, not a map of hook name -> d_model")
    for h, d in hooks.items():
        need(_hook_name_ok(h), f"hook name {h!r} is not an array name inside the store")
        need(_is_int(d) and d > 0, f"hook {h!r} has d_model {_show(d)}, not a positive integer")
    s, c = attrs.get("shard_rows"), attrs.get("chunk_rows")
    need(_is_int(s) and _is_int(c) and c > 0 and s > 0 and s % c == 0, f"shard_rows {_show(s)} is not a positive multiple of chunk_rows {_show(c)}")
    need(isinstance(attrs.get("meta"), dict), f"meta is {_show(attrs.get('meta'))}, not a map")
    need(isinstance(attrs.get("complete"), bool), f"complete is {_show(attrs.get('complete'))}, not true/false")
    layout = Layout(dict(hooks), s, c)
    if attrs["complete"]:
        _check_summary(attrs, layout, need)
    return layout


def _check_summary(attrs: dict, layout: Layout, need) -> None:
    """The attributes finalize writes: row count, per-shard checksums, statistics, content hash."""
    n = attrs.get("n_rows")
    need(_is_int(n) and n > 0, f"n_rows is {_show(n)}, not a positive integer")
    s = layout.shard_rows
    shards = attrs.get("shards")
    need(isinstance(shards, list) and len(shards) == math.ceil(n / s), f"shards is {_show(shards)}, not one record per shard of {n} rows")
    keys = _array_keys(layout)
    for i, r in enumerate(shards):
        ok = isinstance(r, dict) and all(_is_int(r.get(k)) for k in ("index", "start", "stop"))
        ok = ok and (r["index"], r["start"], r["stop"]) == (i, i * s, min((i + 1) * s, n))
        ok = ok and isinstance(r.get("crc32c"), dict) and all(_is_int(r["crc32c"].get(k)) for k in keys)
        need(ok, f"shards[{i}] is not the record of shard {i}")
    stats = attrs.get("stats")
    need(isinstance(stats, dict), f"stats is {_show(stats)}, not a map of hook -> statistics")
    for h, d in layout.hooks.items():
        st = stats.get(h)
        ok = isinstance(st, dict) and isinstance(st.get("mean"), list) and len(st["mean"]) == d
        need(ok and all(map(_is_num, st["mean"])) and _is_num(st.get("mean_sq_norm")), f"stats of hook {h!r} are not a mean of {d} numbers and a mean_sq_norm")
    need(isinstance(attrs.get("content_hash"), str), f"content_hash is {_show(attrs.get('content_hash'))}, not a string")


def content_hash(attrs: dict) -> str:
    """The content hash of a complete store, from its attributes: sha256 of the canonical JSON of
    format, meta, hooks, layout, n_rows, the per-shard checksums and (format 2 on) the statistics.

    No timestamps, ranks or resume history go in: equal content gives an equal hash.
    """
    keys = HASHED + (HASHED_SINCE_2 if attrs["format_version"] >= 2 else ())
    # NaN statistics (from NaN rows) are kept as JSON's NaN; format 1 never hashed any.
    doc = json.dumps({k: attrs[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def _record_ok(r: ShardRecord, layout: Layout) -> bool:
    """A completion record with the fields and types the writer writes (else: redo the shard)."""
    s = layout.shard_rows
    ok = _is_int(r.index) and r.index >= 0 and r.start == r.index * s and _is_int(r.stop) and r.start < r.stop <= r.start + s
    ok = ok and isinstance(r.crc, dict) and all(_is_int(r.crc.get(k)) for k in _array_keys(layout))
    ok = ok and isinstance(r.sums, dict) and isinstance(r.sq_norms, dict)
    return ok and all(
        isinstance(r.sums.get(h), list) and len(r.sums[h]) == d and _is_num(r.sq_norms.get(h)) for h, d in layout.hooks.items()
    )


def _read_records(root: Path, layout: Layout) -> dict[int, ShardRecord]:
    """Per-shard completion records on disk; unreadable or malformed ones count as missing (redo the shard)."""
    out = {}
    rec_dir = root / RECORDS_DIR
    if not rec_dir.is_dir():
        return out
    for p in rec_dir.glob("shard-*.json"):
        try:
            r = ShardRecord(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if _record_ok(r, layout):
            out[r.index] = r
    return out


def create_store(
    path: str | os.PathLike,
    hooks: dict[str, int],
    *,
    n_rows: int,
    meta: dict,
    shard_rows: int = 65536,
    chunk_rows: int = 4096,
    resume: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> StoreWriter:
    """Create (or resume) a store at a local `path` and return its writer.

    hooks: hook name -> d_model. n_rows: capacity, an upper bound (finalize may truncate; a single
    writer grows it if exceeded). meta: JSON provenance (model, dataset, tokenizer, ctx_len, ...).
    A non-empty `path` is refused unless `resume` (meta and layout must match what is stored; the
    finished shards of this writer are checked against their records and bad ones redone) or
    `overwrite` (only an existing saekit store is removed). What a creation killed before its
    attributes were written left behind holds no rows and is replaced. With world_size > 1, rank 0
    creates the store and the other ranks join it afterwards (the caller barriers between).
    """
    if _is_url(path):
        raise SaekitError(f"stores are written to a local directory, not {path}; write locally, then copy")
    if resume and overwrite:
        raise SaekitError("pass either resume or overwrite, not both")
    if sys.byteorder != "little":  # shard files are written as raw little-endian bytes
        raise SaekitError("writing stores needs a little-endian machine (x86-64, arm64)")
    if not 0 <= rank < world_size:
        raise SaekitError(f"rank {rank} is outside 0..{world_size - 1}")
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise SaekitError(f"shard_rows ({shard_rows}) must be a positive multiple of chunk_rows ({chunk_rows})")
    if n_rows <= 0:
        raise SaekitError(f"n_rows (capacity) must be positive, got {n_rows}")
    layout = Layout(_validate_hooks(hooks), int(shard_rows), int(chunk_rows))
    meta = json.loads(_canonical(meta))  # normalise (tuples -> lists) so resume compares like with like
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise SaekitError(f"{root} is a file, not a directory; choose a directory path for the store")
    if rank == 0:
        _discard_unfinished_creation(root)
    non_empty = root.exists() and any(root.iterdir())
    attrs = read_attrs(root) if non_empty else None

    if rank > 0:
        if attrs is None:
            raise SaekitError(f"rank {rank}: no store at {root} yet; rank 0 must call create_store first (barrier after it)")
        stored = _check_attrs(root, attrs)
        if attrs["complete"]:
            raise SaekitError(f"rank {rank}: store {root} is already complete; nothing to write (overwrite it from rank 0 to rebuild)")
        _check_matches(root, stored, attrs["meta"], layout, meta)
        return StoreWriter(root, layout, attrs, rank, world_size)

    if non_empty:
        if overwrite:
            if attrs is None:
                raise SaekitError(f"{root} is not empty and not a saekit store; refusing to delete it, choose a new path")
            _remove_entries(root, [p.name for p in root.iterdir()])
        elif resume:
            if attrs is None:
                raise SaekitError(f"{root} is not empty and not a saekit store; cannot resume it, choose a new path")
            stored = _check_attrs(root, attrs)
            if attrs["complete"]:
                raise SaekitError(
                    f"store {root} is already complete ({attrs['n_rows']} rows); open it to read, or pass overwrite to rebuild"
                )
            _check_matches(root, stored, attrs["meta"], layout, meta)
            return StoreWriter(root, layout, attrs, rank, world_size)
        else:
            what = "a saekit store" if attrs is not None else "not empty"
            raise SaekitError(
                f"{root} is {what}; pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to replace it, or choose a new path"
            )
    attrs = _create_group(root, layout, meta, capacity=int(n_rows))
    return StoreWriter(root, layout, attrs, rank, world_size)


def _check_matches(root: Path, stored: Layout, stored_meta: dict, layout: Layout, meta: dict) -> None:
    if stored != layout:
        raise SaekitError(
            f"store {root} has layout {tuple(stored)} but this run asks for {tuple(layout)}; use the same hooks/shard sizes or a new path"
        )
    if _canonical(stored_meta) != _canonical(meta):
        old, new = stored_meta, meta
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise SaekitError(
            f"store {root} was written with different metadata (differs in: {', '.join(keys)}); resume with the same settings or use a new path"
        )


def _identity(layout: Layout, meta: dict) -> dict:
    """What a store is (format, provenance, layout): the part of its attributes fixed at creation."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "hooks": layout.hooks,
        "shard_rows": layout.shard_rows,
        "chunk_rows": layout.chunk_rows,
    }


def _remove_entries(root: Path, names: Sequence[str]) -> None:
    # the entries, not `root` itself: it may be a mount point or a directory someone made for us.
    for name in names:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _discard_unfinished_creation(root: Path) -> None:
    """Remove what a create_store killed before writing its attributes left (no rows yet), and
    only that: the marker must be there, and nothing but the store's own entries."""
    marker = root / CREATING
    if not marker.is_file():
        return
    try:
        published = read_attrs(root) is not None
    except SaekitError:  # zarr's own first write of zarr.json was cut short
        published = False
    names = [p.name for p in root.iterdir()]
    if published:  # killed after the attributes landed: a store, plus the marker
        marker.unlink()
    elif set(names) <= {CREATING, "zarr.json", ACTS, TOKENS, POSITIONS}:
        _remove_entries(root, [n for n in names if n != CREATING])
        marker.unlink()


def _create_group(root: Path, layout: Layout, meta: dict, capacity: int) -> dict:
    import zarr

    attrs = {
        **_identity(layout, meta),
        "complete": False,
        "n_rows": None,
    }
    root.mkdir(parents=True, exist_ok=True)
    # the marker first: a kill before the attributes are written leaves a directory create_store
    # recognises as an unfinished creation (and replaces), instead of "not a saekit store".
    (root / CREATING).write_text("saekit is creating a store here; if no harvest is running, rerun it with --resume\n")
    group = zarr.create_group(str(root), zarr_format=3, overwrite=False)  # keeps the marker
    acts = group.create_group(ACTS)
    for hook, d in layout.hooks.items():
        a = acts.create_array(
            hook,
            shape=(capacity, d),
            dtype="uint16",
            shards=(layout.shard_rows, d),
            chunks=(layout.chunk_rows, d),
            compressors=None,
            filters=None,
            fill_value=0,
            # every inner chunk present at a fixed offset: shard files stay memory-mappable.
            config={"write_empty_chunks": True},
        )
        a.attrs.update({**BF16_ATTRS, "hook": hook, "d_model": d})
    for name, what in ((TOKENS, "token id"), (POSITIONS, "position in sequence")):
        a = group.create_array(
            name,
            shape=(capacity,),
            dtype="int32",
            shards=(layout.shard_rows,),
            chunks=(layout.chunk_rows,),
            compressors=None,
            filters=None,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        a.attrs.update({"description": f"{what} of every row"})
    # attributes last, in one atomic write: a directory without them is not (yet) a saekit store,
    # and a kill mid-write never leaves half of them behind.
    _write_group_attrs(root, attrs)
    (root / CREATING).unlink()
    return attrs


class StoreWriter:
    """Writes whole shards of a store; see `create_store`.

    `append` fills this writer's shards in order (for rank r of w: shards r, r+w, r+2w, ...);
    `write_shard` writes one explicitly. `resume_row` counts the rows of this writer's stream that
    are already safely on disk (leading complete shards); the caller continues from there.
    `damaged` lists this writer's finished shards that failed their check on opening (redone).
    """

    def __init__(self, root: Path, layout: Layout, attrs: dict, rank: int, world_size: int):
        import zarr

        self.path = root
        self.layout = layout
        self.meta = attrs["meta"]
        self.rank, self.world_size = rank, world_size
        self._group = zarr.open_group(str(root), mode="r+")
        try:
            self._arrays = {key: self._group[key] for key in _array_keys(layout)}
        except KeyError as e:
            raise SaekitError(f"store {root} has no array {e}; it is damaged: re-harvest it with overwrite (--overwrite)") from e
        (root / RECORDS_DIR).mkdir(exist_ok=True)
        done = _read_records(root, layout)
        self.damaged = self._drop_damaged(done)
        # leading full shards of this writer's stream are kept; the first gap (or partial) is redone.
        k = 0
        while (rec := done.get(self._global_shard(k))) is not None and rec.stop - rec.start == layout.shard_rows:
            k += 1
        self._next_local = k
        self.resume_row = k * layout.shard_rows
        self._buf = self._new_buffer()
        self._fill = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-stats")

    def _drop_damaged(self, done: dict[int, ShardRecord]) -> list[str]:
        """Check this writer's finished shards against their records (files there, crc32c of the
        valid rows) and drop the record of each bad one, so it is redone. One line per bad shard."""
        bad = []
        for i in sorted(j for j in done if j % self.world_size == self.rank):
            problem = _shard_problem(self.path, self.layout, done[i])
            if problem is not None:
                (self.path / RECORDS_DIR / f"shard-{i:06d}.json").unlink(missing_ok=True)
                del done[i]
                bad.append(problem)
        return bad

    @property
    def capacity(self) -> int:
        return self._arrays[TOKENS].shape[0]

    def _global_shard(self, local: int) -> int:
        return self.rank + local * self.world_size

    def _new_buffer(self) -> dict[str, np.ndarray]:
        s = self.layout.shard_rows
        buf = {f"{ACTS}/{h}": np.zeros((s, d), np.uint16) for h, d in self.layout.hooks.items()}
        buf[TOKENS] = np.zeros(s, np.int32)
        buf[POSITIONS] = np.zeros(s, np.int32)
        return buf

    def _convert(self, acts: dict, tokens, positions) -> tuple[dict[str, np.ndarray], int]:
        """Validate one batch and convert it to the stored dtypes. Returns (array key -> rows, n)."""
        hooks = self.layout.hooks
        if set(acts) != set(hooks):
            raise SaekitError(f"append got hooks {sorted(acts)} but the store has {sorted(hooks)}; pass exactly those")
        out = {}
        n = None
        for h, d in hooks.items():
            x = acts[h]
            if x.ndim != 2 or x.shape[1] != d:
                raise SaekitError(
                    f"hook {h!r}: rows have shape {tuple(x.shape)} but the store holds [n, {d}]; pass [n, d_model] activations of that hook"
                )
            n = x.shape[0] if n is None else n
            if x.shape[0] != n:
                raise SaekitError(f"hook {h!r} has {x.shape[0]} rows but other hooks have {n}; pass the same rows for every hook")
            out[f"{ACTS}/{h}"] = bf16_bits(x)
        for key, v in ((TOKENS, tokens), (POSITIONS, positions)):
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if v.shape != (n,):
                raise SaekitError(f"{key} has shape {v.shape} but there are {n} rows; pass one {key[:-1]} per row")
            out[key] = v.astype(np.int32)
        return out, n

    def append(self, acts: dict[str, torch.Tensor | np.ndarray], tokens, positions) -> None:
        """Add rows. acts: hook -> [n, d_model] floats (stored as bf16); tokens, positions: [n] ints."""
        data, n = self._convert(acts, tokens, positions)
        s = self.layout.shard_rows
        pos = 0
        while pos < n:
            take = min(n - pos, s - self._fill)
            for key, v in data.items():
                self._buf[key][self._fill : self._fill + take] = v[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == s:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        index = self._global_shard(self._next_local)
        for v in self._buf.values():
            v[self._fill :] = 0  # a final partial shard's padding: zeros, not a previous shard's rows
        self._write(index, self._buf, self._fill)
        self._next_local += 1
        self._fill = 0

    def close(self) -> None:
        """Write the buffered rows as this writer's last (partial) shard. Ranks > 0 end with this;
        rank 0 calls finalize() instead, which does it too."""
        self._flush()
        self._pool.shutdown()

    def write_shard(self, index: int, acts: dict[str, torch.Tensor | np.ndarray], tokens, positions) -> None:
        """Write shard `index` whole (its rows: at most shard_rows; fewer only for the store's last shard)."""
        if index % self.world_size != self.rank:
            raise SaekitError(f"shard {index} belongs to rank {index % self.world_size}, not rank {self.rank} of {self.world_size}")
        data, n = self._convert(acts, tokens, positions)
        if not 0 < n <= self.layout.shard_rows:
            raise SaekitError(f"a shard holds 1..{self.layout.shard_rows} rows, got {n}; split the rows into shards")
        self._write(index, data, n)

    def shard_done(self, index: int) -> bool:
        """True when shard `index` has a completion record (full or partial) on disk."""
        return (self.path / RECORDS_DIR / f"shard-{index:06d}.json").exists()

    def _write(self, index: int, data: dict[str, np.ndarray], n: int) -> None:
        s = self.layout.shard_rows
        start = index * s
        self._ensure_capacity(start + n)
        # drop an old record first: a crash mid-rewrite must not leave a record over torn data.
        rec_path = self.path / RECORDS_DIR / f"shard-{index:06d}.json"
        rec_path.unlink(missing_ok=True)
        # statistics in a helper thread while this one writes files: both release the GIL.
        hooks = list(self.layout.hooks)
        stats = self._pool.map(lambda h: _row_stats(data[f"{ACTS}/{h}"][:n]), hooks)
        crc = {}
        for key, v in data.items():
            if v.shape[0] < s:  # explicit short shard: zero-pad so every inner chunk is present
                v = np.concatenate([v, np.zeros((s - v.shape[0], *v.shape[1:]), v.dtype)])
            write_shard_file(self.path / shard_key(key, v.ndim, index), v, self.layout.chunk_rows)
            crc[key] = crc32c_of(v[:n])
        stats = list(stats)
        sums = {h: t.tolist() for h, (t, _) in zip(hooks, stats)}
        sq = {h: q for h, (_, q) in zip(hooks, stats)}
        rec = ShardRecord(index, start, start + n, crc, sums, sq)
        write_json_atomic(rec_path, rec._asdict())

    def _ensure_capacity(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        if self.world_size > 1:
            raise SaekitError(
                f"rows up to {rows} exceed the store's capacity {self.capacity}; with several writers pass a large enough n_rows to create_store"
            )
        new = max(rows, 2 * self.capacity)
        for a in self._arrays.values():
            a.resize((new, *a.shape[1:]))

    def finalize(self, n_rows: int | None = None) -> None:
        """Flush, optionally truncate to `n_rows`, combine statistics, hash and mark complete.

        With several writers, only rank 0 calls this, after every rank has written (barrier first).
        """
        if self.rank != 0:
            raise SaekitError(f"only rank 0 finalizes a store; rank {self.rank} should stop after writing and barrier")
        self._flush()
        recs = _read_records(self.path, self.layout)
        s = self.layout.shard_rows
        order: list[ShardRecord] = []
        i = 0
        while i in recs:
            order.append(recs[i])
            if recs[i].stop - recs[i].start < s:
                break
            i += 1
        later = sorted(j for j in recs if j > i)
        if later:
            missing = sorted(set(range(i, later[-1] + 1)) - set(recs))
            why = f"shard {i} is partial" if i in recs else f"shards {missing} have no completion record"
            raise SaekitError(f"store {self.path} has a gap: {why} but later shards exist; rerun the writers with resume, then finalize")
        total = order[-1].stop if order else 0
        if n_rows is not None:
            if n_rows > total:
                raise SaekitError(f"finalize(n_rows={n_rows}) but only {total} rows are written; write more rows or pass fewer")
            total = int(n_rows)
        if total == 0:
            raise SaekitError(f"store {self.path} has no rows; append rows before finalize")
        order = [r for r in order if r.start < total]
        if order[-1].stop > total:  # truncating inside a shard: its checksums and stats change
            order[-1] = self._record_from_disk(order[-1], total)
        for a in self._arrays.values():
            a.resize((total, *a.shape[1:]))
        attrs = read_attrs(self.path) or {}
        attrs.update(_summary(self.layout, self.meta, order, total))  # format, version and hash with it
        _write_group_attrs(self.path, attrs)
        # the records now live in the attributes; the directory is not part of the zarr hierarchy.
        shutil.rmtree(self.path / RECORDS_DIR, ignore_errors=True)
        self._pool.shutdown()

    def _record_from_disk(self, rec: ShardRecord, stop: int) -> ShardRecord:
        crc, sums, sq = {}, {}, {}
        for key, a in self._arrays.items():
            v = np.asarray(a[rec.start : stop])
            crc[key] = crc32c_of(v)
            if key.startswith(ACTS + "/"):
                total, sqn = _row_stats(v)
                sums[key[len(ACTS) + 1 :]] = total.tolist()
                sq[key[len(ACTS) + 1 :]] = sqn
        return ShardRecord(rec.index, rec.start, stop, crc, sums, sq)


def _stats(layout: Layout, recs: Sequence[ShardRecord], n_rows: int) -> dict:
    """Per hook: mean row and mean squared row norm, from the shards' float64 sums."""
    stats = {}
    for h in layout.hooks:
        total = np.zeros(layout.hooks[h], np.float64)
        sq = 0.0
        for r in recs:  # fixed shard order: the same float sums for any number of writers
            total += np.asarray(r.sums[h], np.float64)
            sq += r.sq_norms[h]
        stats[h] = {"mean": (total / n_rows).tolist(), "mean_sq_norm": sq / n_rows}
    return stats


def _summary(layout: Layout, meta: dict, recs: Sequence[ShardRecord], n_rows: int) -> dict:
    """The attributes of a finished store: identity, row count, stats, per-shard checksums, content hash."""
    shards = [{"index": r.index, "start": r.start, "stop": r.stop, "crc32c": r.crc} for r in recs]
    attrs = {**_identity(layout, meta), "complete": True, "n_rows": n_rows, "stats": _stats(layout, recs, n_rows), "shards": shards}
    return {**attrs, "content_hash": content_hash(attrs)}


def _write_group_attrs(root: Path, attrs: dict) -> None:
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"] = attrs
    write_json_atomic(root / "zarr.json", doc)


# ---------------------------------------------------------------------------------------------
# reading


class _ShardIndexError(Exception):
    """A shard file that cannot be memory-mapped (layout differs or index corrupt)."""


class _BadShard(SaekitError):
    """A shard that cannot be read as recorded (missing, unreadable, checksum mismatch)."""

    def __init__(self, store: Any, name: str, what: str):
        super().__init__(f"store {store}: shard {name} is {what}; run `saekit verify` to list every bad shard, then re-harvest or restore them")
        self.name, self.what = name, what


def _mmap_shard(file: Path, shape: tuple[int, ...], chunk_rows: int, dtype: np.dtype, n_valid: int) -> np.ndarray:
    """Validate a shard file's index and memory-map its first `n_valid` rows.

    shape: the full shard shape (shard_rows, *row). The index sits at the end: n_inner x (offset,
    nbytes) little-endian uint64, then the crc32c of those bytes. Inner chunks covering the valid
    rows must sit back to back from offset 0 (C-order rows), which is what saekit's writer makes.
    Returns [n_valid, *row] (copy-on-write mapping: writable for torch, never written back).
    Raises OSError when the file cannot be read (FileNotFoundError: it is not there).
    """
    n_inner = shape[0] // chunk_rows
    chunk_bytes = chunk_rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    idx_bytes = n_inner * 16
    size = file.stat().st_size
    if size < idx_bytes + 4:
        raise _ShardIndexError(f"{file} is too short for its index")
    with open(file, "rb") as f:
        f.seek(size - idx_bytes - 4)
        tail = f.read(idx_bytes + 4)
    if len(tail) != idx_bytes + 4:
        raise _ShardIndexError(f"{file} is too short for its index")
    if crc32c.crc32c(tail[:idx_bytes]) != int.from_bytes(tail[idx_bytes:], "little"):
        raise _ShardIndexError(f"{file}: shard index checksum mismatch")
    index = np.frombuffer(tail[:idx_bytes], "<u8").reshape(n_inner, 2)
    need = math.ceil(n_valid / chunk_rows)
    expect = np.arange(need, dtype=np.uint64) * np.uint64(chunk_bytes)
    if not (np.array_equal(index[:need, 0], expect) and np.all(index[:need, 1] == chunk_bytes)):
        raise _ShardIndexError(f"{file}: inner chunks are not contiguous C-order rows")
    if need * chunk_bytes > size - idx_bytes - 4:
        raise _ShardIndexError(f"{file} is shorter than its index claims")
    return np.memmap(file, dtype=dtype, mode="c", offset=0, shape=(n_valid, *shape[1:]))


def _shard_problem(root: Path, layout: Layout, rec: ShardRecord) -> str | None:
    """What is wrong with a finished shard saekit wrote (files there, crc32c of the valid rows
    as recorded), or None. Used on resume; readers check through ActivationStore._load."""
    for key in _array_keys(layout):
        row, dtype = _array_spec(layout, key)
        name = shard_key(key, 1 + len(row), rec.index)
        try:
            v = _mmap_shard(root / name, (layout.shard_rows, *row), layout.chunk_rows, dtype, rec.stop - rec.start)
        except FileNotFoundError:
            return f"{name}: missing"
        except (OSError, _ShardIndexError) as e:
            return f"{name}: unreadable ({type(e).__name__})"
        if crc32c_of(v) != rec.crc[key]:
            return f"{name}: corrupt (checksum mismatch)"
    return None


def _plain_sharded(meta_doc: dict) -> bool:
    """True when an array's zarr.json describes the layout _mmap_shard understands."""
    codecs = meta_doc.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    cfg = codecs[0].get("configuration", {})
    inner = cfg.get("codecs", [])
    idx = cfg.get("index_codecs", [])
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return (
        cfg.get("index_location", "end") == "end"
        and inner == [little]
        and idx == [little, {"name": "crc32c"}]
        and meta_doc.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") == "/"
    )


def open_store(path_or_url: str | os.PathLike, *, allow_incomplete: bool = False, check: bool = True) -> ActivationStore:
    """Open a store for reading: a local directory (memory-mapped) or an fsspec URL (zarr reads).

    The attributes are checked (types, and the content hash recomputed from them: no data read)
    before anything uses them. allow_incomplete: read the complete shards of a store still being
    written (or killed). check: verify each shard's crc32c the first time it is touched (a missing
    shard file is an error either way).
    """
    import zarr

    if _is_url(path_or_url):
        try:
            group = zarr.open_group(str(path_or_url), mode="r")
            attrs = group.attrs.asdict()
        except ValueError as e:  # zarr.json there but not JSON
            raise SaekitError(f"{path_or_url}/zarr.json is damaged (not valid JSON); restore it from a copy or re-harvest") from e
        except Exception as e:  # zarr/fsspec raise many types for "nothing there"
            raise SaekitError(f"cannot open {path_or_url} as a store ({type(e).__name__}); check the URL") from e
        root = None
    else:
        root = Path(path_or_url)
        if not root.exists():
            raise SaekitError(f"no store at {root}; check the path (harvest writes one)")
        attrs = read_attrs(root)
        if attrs is None and (root / CREATING).is_file():
            raise SaekitError(f"creating the store at {root} was interrupted (it holds no rows); rerun the harvest with --resume or --overwrite")
        group = None
    if attrs is None or attrs.get("format") != FORMAT:
        raise SaekitError(f"{path_or_url} is not a saekit activation store; pass the directory that harvest wrote")
    _check_attrs(path_or_url, attrs)
    if not attrs["complete"] and not allow_incomplete:
        raise SaekitError(
            f"store {path_or_url} is incomplete (its writer did not finish); resume the harvest with --resume, or open it with allow_incomplete=True"
        )
    if attrs["complete"] and content_hash(attrs) != attrs["content_hash"]:
        raise SaekitError(
            f"store {path_or_url}: its attributes do not match its content hash (zarr.json was edited or damaged: "
            "metadata, statistics or checksums); restore zarr.json from a copy or re-harvest"
        )
    if group is None:
        group = zarr.open_group(str(root), mode="r")
    return ActivationStore(path_or_url, root, group, attrs, check)


class ActivationStore:
    """Read access to a store: rows as torch bf16, sequential and shuffled iteration, verify."""

    def __init__(self, path, root: Path | None, group, attrs: dict, check: bool):
        self.path = path
        self.meta: dict = attrs["meta"]
        self.layout = Layout(dict(attrs["hooks"]), attrs["shard_rows"], attrs["chunk_rows"])  # checked by open_store
        self.hooks: list[str] = list(self.layout.hooks)
        self.complete: bool = attrs["complete"]
        self.format_version: int = attrs["format_version"]
        self.attrs = attrs
        self._root = root
        self._group = group
        self._check = check
        self._lock = threading.Lock()
        self._views: dict[tuple[str, int], np.ndarray] = {}  # memory-mapped shards (cheap: kept)
        self._fallback: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()  # shards read whole through zarr
        self._fs = None  # fsspec filesystem of a URL store (to tell a missing shard file from fill values)
        if self.complete:
            self.n_rows = int(attrs["n_rows"])
            self.content_hash: str = attrs["content_hash"]
            self._shards = {s["index"]: s for s in attrs["shards"]}
            self._stats = attrs["stats"]
        else:  # readable part of an unfinished store: leading complete shards
            recs = _read_records(root, self.layout) if root is not None else {}
            order = []
            while (r := recs.get(len(order))) is not None:
                order.append(r)
                if r.stop - r.start < self.layout.shard_rows:
                    break
            self.n_rows = order[-1].stop if order else 0
            self.content_hash = ""
            self._shards = {r.index: {"index": r.index, "start": r.start, "stop": r.stop, "crc32c": r.crc} for r in order}
            self._stats = _stats(self.layout, order, self.n_rows) if order else {}
        self._plain = {}
        for key in self._array_keys():
            try:
                doc = json.loads((root / key / "zarr.json").read_text()) if root is not None else None
            except (OSError, ValueError):
                doc = None
            self._plain[key] = isinstance(doc, dict) and _plain_sharded(doc) and sys.byteorder == "little"

    # -- small accessors ------------------------------------------------------------------------

    def _array_keys(self) -> list[str]:
        return _array_keys(self.layout)

    def resolve_hook(self, hook: str | None) -> str:
        """None -> the store's only hook; a name -> itself if the store has it."""
        if hook is None:
            if len(self.hooks) == 1:
                return self.hooks[0]
            raise SaekitError(f"store {self.path} has several hooks ({', '.join(self.hooks)}); pick one with --hook")
        if hook not in self.layout.hooks:
            raise SaekitError(f"store {self.path} has no hook {hook!r}; it has: {', '.join(self.hooks)}")
        return hook

    def d_model(self, hook: str | None = None) -> int:
        return self.layout.hooks[self.resolve_hook(hook)]

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.layout.shard_rows)

    def stats(self, hook: str | None = None) -> HookStats:
        """Mean row and mean squared row norm of `hook`, computed by the writer from every row."""
        h = self.resolve_hook(hook)
        if h not in self._stats:
            raise SaekitError(f"store {self.path} has no complete shards yet, so no statistics; finish the harvest first")
        s = self._stats[h]
        return HookStats(torch.tensor(s["mean"], dtype=torch.float32), float(s["mean_sq_norm"]))

    def size_on_disk(self) -> int | None:
        """Bytes of all files under a local store (None for URLs)."""
        if self._root is None:
            return None
        return sum(p.stat().st_size for p in self._root.rglob("*") if p.is_file())

    # -- shard access ---------------------------------------------------------------------------

    def _shard_range(self, index: int) -> tuple[int, int]:
        s = self.layout.shard_rows
        return index * s, min((index + 1) * s, self.n_rows)

    def _array(self, key: str):
        return self._group[key]

    def _view(self, key: str, index: int) -> np.ndarray:
        """The valid rows of one shard, checked the first time they are touched: memory-mapped
        (kept for the store's life) or read whole through zarr (kept in a small LRU cache)."""
        k = (key, index)
        v = self._views.get(k)
        if v is not None:
            return v
        with self._lock:
            if k in self._views:
                return self._views[k]
            if k in self._fallback:
                self._fallback.move_to_end(k)
                return self._fallback[k]
            v = self._load(key, index, self._check)
            if isinstance(v, np.memmap):
                self._views[k] = v
                return v
            self._fallback[k] = v
            while len(self._fallback) > 2 and sum(a.nbytes for a in self._fallback.values()) > FALLBACK_CACHE_BYTES:
                self._fallback.popitem(last=False)
            return v

    def _load(self, key: str, index: int, check: bool) -> np.ndarray:
        """Read one shard's valid rows: a memory map where the file's layout allows, else whole
        through zarr. Missing or unreadable files raise; so does a crc32c mismatch when `check`."""
        row, dtype = _array_spec(self.layout, key)
        name = shard_key(key, 1 + len(row), index)
        start, stop = self._shard_range(index)
        try:
            size = self._file_size(name)
            if not size:  # zarr would read a missing or empty shard file as its fill value (zeros)
                raise _BadShard(self.path, name, "missing" if size is None else "empty (0 bytes)")
            v = None
            if self._root is not None and self._plain[key]:
                try:
                    v = _mmap_shard(self._root / name, (self.layout.shard_rows, *row), self.layout.chunk_rows, dtype, stop - start)
                except _ShardIndexError:
                    pass  # another writer's layout: zarr may still read it, and the crc32c below decides
            if v is None:
                v = np.asarray(self._array(key)[start:stop])
        except _BadShard:
            raise
        except Exception as e:  # zarr and fsspec raise many types for a damaged or vanished file
            raise _BadShard(self.path, name, f"unreadable ({type(e).__name__})") from e
        if check and crc32c_of(v) != self._shards[index]["crc32c"][key]:
            raise _BadShard(self.path, name, "corrupt (checksum mismatch)")
        return v

    def _file_size(self, name: str) -> int | None:
        """Bytes of a shard file, None when it is not there."""
        if self._root is not None:
            f = self._root / name
            return f.stat().st_size if f.is_file() else None
        if self._fs is None:
            import fsspec

            self._fs = fsspec.core.url_to_fs(str(self.path))
        fs, base = self._fs
        path = f"{base.rstrip('/')}/{name}"
        return fs.size(path) if fs.isfile(path) else None

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of an array as numpy (a view when they sit in one shard)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise SaekitError(f"rows [{start}, {stop}) are outside the store's {self.n_rows} rows")
        s = self.layout.shard_rows
        parts = []
        pos = start
        while pos < stop:
            i = pos // s
            end = min(stop, (i + 1) * s)
            parts.append(self._view(key, i)[pos - i * s : end - i * s])
            pos = end
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self._empty(key)
        return np.concatenate(parts)

    def _empty(self, key: str) -> np.ndarray:
        row, dtype = _array_spec(self.layout, key)
        return np.zeros((0, *row), dtype)

    # -- public reads ---------------------------------------------------------------------------

    def rows(self, hook: str | None, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `hook` as bf16 [n, d]; zero-copy when they lie in one mapped shard."""
        return bits_to_bf16(self._read(f"{ACTS}/{self.resolve_hook(hook)}", start, stop))

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """Token ids of rows [start, stop): int32 [n]."""
        return torch.from_numpy(self._read(TOKENS, start, stop))

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """Position in the sequence of rows [start, stop): int32 [n]."""
        return torch.from_numpy(self._read(POSITIONS, start, stop))

    def take(self, hook: str | None, idx) -> torch.Tensor:
        """Rows at `idx` (any order, repeats allowed) as bf16 [len(idx), d]."""
        key = f"{ACTS}/{self.resolve_hook(hook)}"
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise SaekitError(f"row indices must be in [0, {self.n_rows}); got {idx.min()}..{idx.max()}")
        return bits_to_bf16(self._take(key, idx))

    def _take(self, key: str, idx: np.ndarray) -> np.ndarray:
        s = self.layout.shard_rows
        out = np.empty((idx.size, self.layout.hooks[key[len(ACTS) + 1 :]]), np.uint16)
        shard = idx // s
        for i in np.unique(shard):
            sel = np.flatnonzero(shard == i)
            local = idx[sel] - i * s
            out[sel] = np.take(self._view(key, int(i)), local, axis=0)  # numpy gather: much faster than torch indexing
        return out

    def iter_rows(self, hook: str | None, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Consecutive batches of rows [start, stop) as bf16 [<=batch_size, d]."""
        key = f"{ACTS}/{self.resolve_hook(hook)}"
        stop = self.n_rows if stop is None else stop
        for s in range(start, stop, batch_size):
            yield bits_to_bf16(self._read(key, s, min(s + batch_size, stop)))

    # -- shuffled batches ----------------------------------------------------------------------

    def shuffled_batches(
        self,
        hook: str | None,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        stop_row: int | None = None,
        window_blocks: int = 16,
        drop_last: bool = False,
        prefetch: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Seeded shuffled minibatches bf16 [batch_size, d] of rows below `stop_row`.

        Blocks of chunk_rows rows are permuted by (seed, epoch); rank r of w takes every w-th block
        of that permutation, so across ranks each row appears exactly once per epoch. The rank's
        blocks are taken `window_blocks` at a time, the window's rows are permuted, and consecutive
        batches are cut from the resulting stream (leftovers carry into the next window). Within
        a batch, rows come in window order (one gather per block, straight from the mapped file;
        the batch's membership is what is random). The next window is paged in by a background
        thread. `start_batch` skips that many batches without reading them (resume). The last
        batch may be short unless `drop_last`.
        """
        key = f"{ACTS}/{self.resolve_hook(hook)}"
        if batch_size <= 0:
            raise SaekitError(f"batch_size must be positive, got {batch_size}")
        plan = shuffle_plan(
            self.n_rows if stop_row is None else min(stop_row, self.n_rows),
            self.layout.chunk_rows,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            window_blocks=window_blocks,
        )
        skip = start_batch * batch_size
        first = 0
        while first < len(plan) and skip >= plan[first].n_rows:  # whole windows skipped unread
            skip -= plan[first].n_rows
            first += 1
        # a plain function returning a generator: bad arguments fail here, not at the first next().
        return self._batches(key, batch_size, plan, first, skip, drop_last, prefetch)

    def _batches(
        self, key: str, batch_size: int, plan: list[Window], first: int, skip: int, drop_last: bool, prefetch: bool
    ) -> Iterator[torch.Tensor]:
        d = self.layout.hooks[key[len(ACTS) + 1 :]]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-prefetch") if prefetch else None
        load = (lambda j: pool.submit(self._window_blocks, key, plan[j])) if pool else (lambda j: _Done(self._window_blocks(key, plan[j])))
        try:
            pending = load(first) if first < len(plan) else None
            out, filled = np.empty((batch_size, d), np.uint16), 0
            for j in range(first, len(plan)):
                blocks = pending.result()
                if j + 1 < len(plan):
                    pending = load(j + 1)  # page in the next window while this one is consumed
                starts = np.cumsum([0] + [len(b) for b in blocks])
                perm = plan[j].row_perm()
                pos = skip if j == first else 0
                while pos < perm.size:
                    take = perm[pos : pos + batch_size - filled]
                    _gather(blocks, starts, take, out[filled : filled + take.size])
                    filled += take.size
                    pos += take.size
                    if filled == batch_size:
                        yield bits_to_bf16(out)
                        out, filled = np.empty((batch_size, d), np.uint16), 0
            if filled and not drop_last:
                yield bits_to_bf16(out[:filled])
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _window_blocks(self, key: str, window: Window) -> list[np.ndarray]:
        """A window's blocks, each uint16 [rows, d], with their pages resident.

        Memory-mapped blocks are views; touching one byte per page makes the kernel read them now
        (in the prefetch thread) rather than on the first gather. On the zarr path each block is
        read into RAM.
        """
        blocks = [self._read(key, a, b) for a, b in window.blocks]
        for v in blocks:
            if isinstance(v, np.memmap):
                _advise_willneed(v)
        for v in blocks:
            if isinstance(v, np.memmap):
                flat = v.reshape(-1).view(np.uint8)
                int(flat[:: mmap.PAGESIZE].sum())  # one byte per page: fault the block in
        return blocks

    # -- integrity -----------------------------------------------------------------------------

    def verify(self, progress: bool = False) -> list[str]:
        """Check the store against itself; one line per problem ([] if clean).

        Recomputes the content hash from the attributes, every shard's crc32c, and (when every
        shard reads clean) the statistics from the rows, in the writer's float64 order, so they
        compare exactly.
        """
        bad = []
        if self.complete and content_hash(self.attrs) != self.content_hash:
            bad.append("content_hash: does not match the attributes (zarr.json was edited)")
        expected = self.n_shards if self.complete else max(self._shards, default=-1) + 1
        recs = []
        for i in tqdm(range(expected), desc="verify", unit="shard", disable=not progress):
            problems, rec = self._verify_shard(i)
            bad += problems
            recs.append(rec)
        if recs and not bad:
            got = _stats(self.layout, recs, self.n_rows)
            for h in self.hooks:
                if json.dumps(got[h], sort_keys=True) != json.dumps(self._stats[h], sort_keys=True):  # exact, NaN too
                    bad.append(f"stats.{h}: mean / mean_sq_norm do not match the rows (recomputed from them)")
        return bad

    def _verify_shard(self, i: int) -> tuple[list[str], ShardRecord | None]:
        """(problems, the shard's record rebuilt from its rows) for shard i."""
        rec = self._shards.get(i)
        problems, sums, sq = [], {}, {}
        for key in self._array_keys():
            row, _ = _array_spec(self.layout, key)
            name = shard_key(key, 1 + len(row), i)
            if rec is None:
                problems.append(f"{name}: no checksum recorded (shard missing)")
                continue
            try:
                v = self._load(key, i, check=False)
            except _BadShard as e:
                problems.append(f"{e.name}: {e.what}")
                continue
            if crc32c_of(v) != rec["crc32c"][key]:
                problems.append(f"{name}: corrupt (checksum mismatch)")
            elif key.startswith(ACTS + "/"):
                sums[key[len(ACTS) + 1 :]], sq[key[len(ACTS) + 1 :]] = _row_stats(v)  # what the writer computed
        if rec is None:
            return problems, None
        return problems, ShardRecord(i, rec["start"], rec["stop"], rec["crc32c"], sums, sq)


def _gather(blocks: list[np.ndarray], starts: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
    """out[:] = rows `idx` of the blocks' concatenation, in increasing index order.

    blocks: [rows_b, d] each; starts: [len(blocks)+1] cumulative row offsets; idx: [m]; out: [m, d].
    One np.take per block, straight into `out` (mode='clip' avoids numpy's buffered copy; the
    indices are in range by construction).
    """
    idx = np.sort(idx)
    which = np.searchsorted(starts, idx, side="right") - 1
    cuts = np.flatnonzero(np.diff(which)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, idx.size]):
        b = which[lo]
        np.take(blocks[b], idx[lo:hi] - starts[b], axis=0, out=out[lo:hi], mode="clip")


def _advise_willneed(v: np.memmap) -> None:
    """Ask the kernel to start reading a mapped block (advice only; ignored where unsupported)."""
    mm = getattr(v, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_WILLNEED"):
        return
    try:
        # the view's byte offset into the file mapping, from the data pointers (slices of a
        # memmap do not update .offset).
        start = v.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data
        lo = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, lo, start + v.nbytes - lo)
    except (OSError, ValueError, TypeError):
        pass


class _Done:
    """A finished future (the no-prefetch path)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class Window(NamedTuple):
    """One shuffle window of a rank: its blocks as row ranges, and the seed of its row permutation."""

    blocks: list[tuple[int, int]]  # [start, stop) row ranges, in read order
    n_rows: int
    seed: tuple[int, ...]

    def row_perm(self) -> np.ndarray:
        return np.random.default_rng(list(self.seed)).permutation(self.n_rows)


def shuffle_plan(
    n_rows: int, block_rows: int, *, seed: int, epoch: int, rank: int, world_size: int, window_blocks: int
) -> list[Window]:
    """The windows rank `rank` of `world_size` reads in one epoch (pure; no data touched).

    The block permutation depends only on (seed, epoch, n_rows, block_rows), so the ranks' shares
    partition the rows for any world size.
    """
    if not 0 <= rank < world_size:
        raise SaekitError(f"rank {rank} is outside 0..{world_size - 1}")
    if window_blocks <= 0:
        raise SaekitError(f"window_blocks must be positive, got {window_blocks}")
    n_blocks = math.ceil(n_rows / block_rows)
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks)[rank::world_size]
    plan = []
    for w, s in enumerate(range(0, order.size, window_blocks)):
        blocks = [(int(b) * block_rows, min((int(b) + 1) * block_rows, n_rows)) for b in order[s : s + window_blocks]]
        plan.append(Window(blocks, sum(b - a for a, b in blocks), (seed, epoch, world_size, rank, w)))
    return plan

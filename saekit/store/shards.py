"""The one sharded writer: whole-shard files, completion records, atomic attributes, safe creation.

Both saekit stores (the activation store, `saekit.store`, and the codes store, `saekit.codes`) are
Zarr v3 groups of uncompressed sharded arrays written the same way:

    <root>/zarr.json                     the group; saekit's attributes are written last, atomically
    <root>/.saekit-creating              marker, only while the empty group is being created
    <root>/<array>/c/<i>[/0...]          shard file i, written whole by `write_shard_file`
    <root>/.saekit-shards/.../shard-NNNNNN.json   completion record of shard i, written after its data

A shard without a valid record is redone, so a killed writer never leaves a shard that looks
complete. This module owns that mechanism and the byte layout of a shard file (writing it, and
validating it before it is memory-mapped); what the arrays mean belongs to each store.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import stat
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import numpy as np

from saekit.atomic import read_regular, write_atomic, writing
from saekit.errors import SaekitError, file_kind

RECORDS_DIR = ".saekit-shards"
CREATING = ".saekit-creating"  # marker file: present from the start of a creation until its attributes are written

__all__ = [
    "CREATING",
    "RECORDS_DIR",
    "ShardLayoutError",
    "ShardRecord",
    "crc32c_of",
    "create_marked_group",
    "create_sharded_array",
    "clear_group",
    "discard_unfinished_creation",
    "group_attrs",
    "is_plain_sharded",
    "is_record_name",
    "map_shard_file",
    "pad_rows",
    "read_group_attrs",
    "read_record",
    "read_records",
    "read_remote_records",
    "record_path",
    "remove_entries",
    "shard_key",
    "write_group_attrs",
    "write_json_atomic",
    "write_recorded_shard",
    "write_shard_file",
]


# ---------------------------------------------------------------------------------------------
# Shard files


def crc32c_of(a: np.ndarray) -> int:
    """crc32c of an array's bytes (C order): the per-shard checksum."""
    return crc32c.crc32c(np.ascontiguousarray(a).data.cast("B"))


def shard_key(array_key: str, ndim: int, index: int) -> str:
    """Relative path of a shard file under the group (zarr's default '/' chunk key encoding)."""
    return f"{array_key}/c/{index}" + "/0" * (ndim - 1)


def pad_rows(rows: np.ndarray, shard_rows: int) -> np.ndarray:
    """A short last shard zero-padded to `shard_rows`, so every inner chunk exists. [n, ...] -> [shard_rows, ...]"""
    if rows.shape[0] >= shard_rows:
        return rows
    return np.concatenate([rows, np.zeros((shard_rows - rows.shape[0], *rows.shape[1:]), rows.dtype)])


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
    _remove_stale_partials(file)
    with writing(file, ".partial") as tmp, open(tmp, "wb") as f:
        f.write(np.ascontiguousarray(rows).data.cast("B"))
        f.write(tail)


def _remove_stale_partials(file: Path) -> None:
    # A temp file of this shard file left by a failed or killed earlier write (its shard has no
    # record, which is why it is written again): only this shard's writer ever writes here.
    for stale in file.parent.glob(f".{file.name}.*.partial"):
        stale.unlink(missing_ok=True)


class ShardLayoutError(Exception):
    """A shard file that cannot be memory-mapped (another writer's layout, or a corrupt index)."""


def map_shard_file(file: Path, shape: tuple[int, ...], chunk_rows: int, dtype: np.dtype, n_valid: int) -> np.ndarray:
    """Validate a shard file's index and memory-map its first `n_valid` rows.

    shape: the full shard shape (shard_rows, *row). The index sits at the end: n_inner x (offset,
    nbytes) little-endian uint64, then the crc32c of those bytes. Inner chunks covering the valid
    rows must sit back to back from offset 0 (C-order rows), which is what `write_shard_file` makes.
    Returns [n_valid, *row] (copy-on-write mapping: writable for torch, never written back).
    Raises ShardLayoutError when the layout differs, OSError when the file cannot be read
    (FileNotFoundError: it is not there).
    """
    n_inner = shape[0] // chunk_rows
    chunk_bytes = chunk_rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    idx_bytes = n_inner * 16
    st = file.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below
        raise ShardLayoutError(f"{file} is {file_kind(st.st_mode)}, not a regular file")
    size = st.st_size
    if size < idx_bytes + 4:
        raise ShardLayoutError(f"{file} is too short for its index")
    with open(file, "rb") as f:
        f.seek(size - idx_bytes - 4)
        tail = f.read(idx_bytes + 4)
    if len(tail) != idx_bytes + 4:
        raise ShardLayoutError(f"{file} is too short for its index")
    if crc32c.crc32c(tail[:idx_bytes]) != int.from_bytes(tail[idx_bytes:], "little"):
        raise ShardLayoutError(f"{file}: shard index checksum mismatch")
    index = np.frombuffer(tail[:idx_bytes], "<u8").reshape(n_inner, 2)
    need = math.ceil(n_valid / chunk_rows)
    expect = np.arange(need, dtype=np.uint64) * np.uint64(chunk_bytes)
    if not (np.array_equal(index[:need, 0], expect) and np.all(index[:need, 1] == chunk_bytes)):
        raise ShardLayoutError(f"{file}: inner chunks are not contiguous C-order rows")
    if need * chunk_bytes > size - idx_bytes - 4:
        raise ShardLayoutError(f"{file} is shorter than its index claims")
    return np.memmap(file, dtype=dtype, mode="c", offset=0, shape=(n_valid, *shape[1:]))


def is_plain_sharded(array_meta: dict) -> bool:
    """True when an array's zarr.json describes the layout `map_shard_file` understands."""
    codecs = array_meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    cfg = codecs[0].get("configuration", {})
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return (
        cfg.get("index_location", "end") == "end"
        and cfg.get("codecs", []) == [little]
        and cfg.get("index_codecs", []) == [little, {"name": "crc32c"}]
        and array_meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") == "/"
    )


# ---------------------------------------------------------------------------------------------
# Completion records


class ShardRecord(NamedTuple):
    """Completion record of one shard, written after its data: a shard without one is redone."""

    index: int
    start: int  # first row
    stop: int  # one past the last valid row
    crc32c: dict[str, int]  # array key -> crc32c of the valid rows' bytes
    extra: dict[str, Any]  # what the writer measured on the way (activation rows' sums; codes' compute seconds)

    def to_json(self) -> dict:
        return {"index": self.index, "start": self.start, "stop": self.stop, "crc32c": self.crc32c, **self.extra}


_RECORD_NAME = re.compile(rf"{re.escape(RECORDS_DIR)}/shard-(\d{{6,}})\.json")


def is_record_name(name: str) -> bool:
    """True for the name of a completion record inside a store (`<RECORDS_DIR>/shard-NNNNNN.json`)."""
    return _RECORD_NAME.fullmatch(name) is not None


def record_path(records: Path, index: int) -> Path:
    """Where the record of shard `index` lives in the records directory `records`."""
    return records / f"shard-{index:06d}.json"


def _parse_record(text: str) -> ShardRecord | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if "crc" in doc and "crc32c" not in doc:  # activation-store records written before saekit.store.shards
        doc["crc32c"] = doc.pop("crc")
    base = [doc.pop(k, None) for k in ("index", "start", "stop", "crc32c")]
    if not (all(type(v) is int for v in base[:3]) and isinstance(base[3], dict)):  # JSON ints, not bools
        return None
    return ShardRecord(*base, extra=doc)


def read_record(records: Path, index: int) -> ShardRecord | None:
    """The record of shard `index`, or None when it is missing or unreadable (then the shard is redone)."""
    try:
        rec = _parse_record(read_regular(record_path(records, index)).decode(errors="replace"))
    except OSError:
        return None
    return rec if rec is not None and rec.index == index else None


def read_records(records: Path) -> dict[int, ShardRecord]:
    """Every readable record in `records`, by shard index (unreadable ones count as missing)."""
    texts = {}
    for p in records.glob("shard-*.json") if records.is_dir() else []:
        try:
            texts[p.name] = read_regular(p).decode(errors="replace")
        except OSError:
            continue
    return _parse_records(texts)


def read_remote_records(remote: Any, records: str) -> dict[int, ShardRecord]:
    """`read_records` of the folder `records` of a `saekit.store.remote.Remote` (one listing, one read each)."""
    from saekit.store.remote import each_parallel  # lazy: only remote stores need it

    names = [n for n in remote.list(records) if n.count("/") == records.count("/") + 1]
    raw = each_parallel(remote.read_bytes, names, threads=8)
    return _parse_records({n.rsplit("/", 1)[1]: b.decode(errors="replace") for n, b in zip(names, raw) if b})


def _parse_records(texts: dict[str, str]) -> dict[int, ShardRecord]:
    """Records from (file name -> text); one not named after its own index counts as missing."""
    out = {}
    for name, text in texts.items():
        rec = _parse_record(text)
        if rec is not None and name == record_path(Path(), rec.index).name:
            out[rec.index] = rec
    return out


def write_recorded_shard(
    root: Path,
    records: Path,
    index: int,
    arrays: dict[str, np.ndarray],
    n_valid: int,
    *,
    shard_rows: int,
    chunk_rows: int,
    extra: Callable[[], dict] = dict,
) -> ShardRecord:
    """Write shard `index` of each array whole, then its completion record into `records`.

    arrays: array key -> [n_valid or shard_rows, ...] rows of the shard (a short one is zero-padded).
    `extra()` is called once the data is on disk, so the caller can compute what goes in the
    record meanwhile (e.g. statistics in another thread).
    """
    path = record_path(records, index)
    # drop an old record first: a crash mid-rewrite must not leave a record over torn data.
    path.unlink(missing_ok=True)
    crc = {}
    for key, v in arrays.items():
        write_shard_file(root / shard_key(key, v.ndim, index), pad_rows(v, shard_rows), chunk_rows)
        crc[key] = crc32c_of(v[:n_valid])
    start = index * shard_rows
    rec = ShardRecord(index, start, start + n_valid, crc, extra())
    records.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rec.to_json())
    return rec


# ---------------------------------------------------------------------------------------------
# Atomic JSON and group attributes


def write_json_atomic(path: Path, obj: Any) -> None:
    # write-temp-then-rename: a reader or a resumed writer sees the old file or the new one.
    write_atomic(path, json.dumps(obj, indent=1))


def read_group_attrs(root: Path, fmt: str, *, what: str, redo: str) -> dict | None:
    """The attributes of the zarr group at `root` when they are saekit's format `fmt`; None if
    there is no zarr.json there or another program's. A zarr.json that cannot be parsed is damaged:
    a one-line error saying so and what to do (`what`: the kind of data, `redo`: how to remake it),
    never "not saekit's"."""
    f = root / "zarr.json"
    try:
        data = read_regular(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        raise SaekitError(f"cannot read {f} ({e.strerror}); check its permissions") from e
    return group_attrs(data, str(root), fmt, what=what, redo=redo)


def group_attrs(data: bytes, root: str, fmt: str, *, what: str, redo: str) -> dict | None:
    """`read_group_attrs` for the bytes of a zarr.json read elsewhere (e.g. from object storage at `root`)."""
    try:
        doc = json.loads(data)
    except ValueError as e:  # not JSON, not UTF-8: a truncated or overwritten file
        doc = e
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        why = "not valid JSON" if isinstance(doc, ValueError) else "not a zarr group document"
        raise SaekitError(
            f"{root}/zarr.json is damaged ({why}), so {root} cannot be read or recognised as {what} and is left as it is; "
            f"restore zarr.json from a copy, or delete {root} and {redo}"
        )
    return attrs if attrs.get("format") == fmt else None


def write_group_attrs(root: Path, attrs: dict) -> None:
    """Replace the group's attributes in one atomic write of its zarr.json."""
    doc = json.loads(read_regular(root / "zarr.json"))
    doc["attributes"] = attrs
    write_json_atomic(root / "zarr.json", doc)


# ---------------------------------------------------------------------------------------------
# Creation: recognisable at every moment


def create_marked_group(root: Path, attrs: dict, build: Callable[[Any], None], note: str) -> None:
    """Create saekit's zarr group at `root` (new or empty) with `build(group)` adding its arrays.

    zarr writes the group's zarr.json first and saekit's attributes come last, so a kill in between
    would leave "not saekit's". The `CREATING` marker (text: `note`) is written before anything
    else and removed after the attributes, so `discard_unfinished_creation` can recognise and
    replace what such a kill left. The attributes land in one atomic write.
    """
    import zarr  # lazy: zarr takes about a second to import and `saekit --help` must stay fast

    root.mkdir(parents=True, exist_ok=True)
    (root / CREATING).write_text(note)
    group = zarr.create_group(str(root), zarr_format=3, overwrite=False)  # keeps the marker
    build(group)
    write_group_attrs(root, attrs)
    (root / CREATING).unlink()


def create_sharded_array(
    group: Any, name: str, shape: tuple[int, ...], dtype: str, *, shard_rows: int, chunk_rows: int, attrs: dict
) -> None:
    """An uncompressed sharded array in `group`: shards of shard_rows rows, inner chunks of chunk_rows rows.

    Every inner chunk sits at a fixed offset (`write_empty_chunks`), so the shard files saekit
    writes itself match zarr's own byte for byte and can be memory-mapped.
    """
    a = group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        shards=(shard_rows, *shape[1:]),
        chunks=(chunk_rows, *shape[1:]),
        compressors=None,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    a.attrs.update(attrs)


# zarr.json half-written: zarr's own temp file, or `write_json_atomic`'s (the attributes)
_ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial|\.zarr\.json\.\d+\.tmp")


def discard_unfinished_creation(root: Path, fmt: str, own_entries: Collection[str] | None) -> None:
    """Remove what a `create_marked_group` killed before its attributes were written left (no rows
    yet), and only that: the marker must be there, and nothing but the creator's `own_entries`.
    own_entries None: `root` is a directory saekit names inside its own output, and goes entirely
    (else `root` itself stays: it may be a mount point or a directory the user made)."""
    marker = root / CREATING
    if not marker.is_file():
        return
    try:
        published = read_group_attrs(root, fmt, what="", redo="") is not None
    except SaekitError:  # zarr's own first write of zarr.json was cut short
        published = False
    names = [p.name for p in root.iterdir()]
    if published:  # killed after the attributes landed: a complete creation, plus the marker
        marker.unlink()
    elif own_entries is None:
        shutil.rmtree(root)
    elif all(n in {CREATING, "zarr.json", *own_entries} or _ZARR_PARTIAL.fullmatch(n) for n in names):
        remove_entries(root, [n for n in names if n != CREATING])
        marker.unlink()


def clear_group(root: Path, note: str) -> None:
    """Empty the saekit group at `root` (`--overwrite`) so that a kill part way is recognised:
    the `CREATING` marker (text: `note`) first, then zarr.json (its attributes), then the rest.
    What a kill leaves is an unfinished creation, which `discard_unfinished_creation` removes."""
    (root / CREATING).write_text(note)
    (root / "zarr.json").unlink(missing_ok=True)
    remove_entries(root, [p.name for p in root.iterdir() if p.name != CREATING])


def remove_entries(root: Path, names: Sequence[str]) -> None:
    """Remove these entries of `root` (files or directory trees), not `root` itself: it may be a
    mount point or a directory someone made for us."""
    for name in names:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

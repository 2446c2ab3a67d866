"""What an activation store is: its names, layout, bf16 encoding, attributes, content hash and statistics.

The writer (`saekit.store.writer`) and the reader (`saekit.store.reader`) both build on this
module; see `saekit.store` for the layout of a store on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeGuard

import numpy as np
import torch

from saekit.errors import SaekitError, url_scheme
from saekit.store.shards import RECORDS_DIR, ShardRecord, group_attrs, read_group_attrs, read_records, shard_key

FORMAT = "saekit-activation-store"
FORMAT_VERSION = 2  # 2: the content hash covers the statistics too (format 1 stores are still read)
ACTS = "acts"
TOKENS = "tokens"
POSITIONS = "positions"
TRUTH = "truth"
TRUTH_INDICES, TRUTH_VALUES = f"{TRUTH}/indices", f"{TRUTH}/values"
"""A synthetic store's true codes of every row: [n, truth] feature indices and activations."""
TRUTH_FEATURES = f"{TRUTH}/features.safetensors"
"""A synthetic store's true feature directions (`features` [n_features, d], `bias` [d]); its
sha256 is in the store's meta (`meta["synthetic"]["features_sha256"]`), so the content hash covers it."""
# The attributes the content hash covers, by format version.
HASHED = ("format", "format_version", "meta", "hooks", "shard_rows", "chunk_rows", "n_rows", "shards")
HASHED_SINCE_2 = ("stats",)
BF16_ATTRS = {"dtype": "bfloat16", "encoding": "bfloat16-bits-as-uint16"}


class HookStats(NamedTuple):
    """Running statistics of one hook over every row of the store."""

    mean: torch.Tensor  # [d_model] float32
    mean_sq_norm: float  # mean over rows of ||x||^2


class StoreLayout(NamedTuple):
    """The arrays of an activation store and how they are cut into shards."""

    hooks: dict[str, int]  # hook -> d_model, in store order
    shard_rows: int
    chunk_rows: int
    truth: int = 0  # slots per row of the true codes (a synthetic store); 0: no ground truth


# ---------------------------------------------------------------------------------------------
# bf16 <-> uint16 bits, statistics


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


def row_stats(u16: np.ndarray, block: int = 2048) -> tuple[np.ndarray, float]:
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


def record_sums(stats: dict[str, tuple[np.ndarray, float]]) -> dict:
    """What a shard's completion record holds about its rows: hook -> `row_stats` of its rows, as
    the record's fields `sums` (float64 sum of rows) and `sq_norms` (sum of squared row norms)."""
    return {"sums": {h: t.tolist() for h, (t, _) in stats.items()}, "sq_norms": {h: q for h, (_, q) in stats.items()}}


def combined_stats(layout: StoreLayout, recs: Sequence[ShardRecord], n_rows: int) -> dict:
    """Per hook: mean row and mean squared row norm, from the shards' float64 sums."""
    stats = {}
    for h, d in layout.hooks.items():
        total = np.zeros(d, np.float64)
        sq = 0.0
        for r in recs:  # fixed shard order: the same float sums for any number of writers
            total += np.asarray(r.extra["sums"][h], np.float64)
            sq += r.extra["sq_norms"][h]
        stats[h] = {"mean": (total / n_rows).tolist(), "mean_sq_norm": sq / n_rows}
    return stats


# ---------------------------------------------------------------------------------------------
# names and arrays


def canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SaekitError(f"store metadata must be plain JSON (str/int/float/list/dict): {e}") from e


def is_url(path: str | os.PathLike) -> bool:
    """True for any URL-shaped argument, file:// included (`errors.url_scheme`)."""
    return url_scheme(path) is not None


def hook_name_ok(name: Any) -> bool:
    """True for a hook name that is one array name inside the store (never a path out of it)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith((".", "__"))
    )


def validate_hooks(hooks: dict[str, int]) -> dict[str, int]:
    if not hooks:
        raise SaekitError("a store needs at least one hook; pass hooks={'blocks.0.hook_resid_pre': 768}")
    out = {}
    for name, d in hooks.items():
        if not hook_name_ok(name):
            raise SaekitError(f"hook name {name!r} cannot be a store array name; drop '/' and leading '.'/'__'")
        if int(d) <= 0:
            raise SaekitError(f"hook {name!r} has d_model={d}; it must be a positive integer")
        out[str(name)] = int(d)
    return out


def array_keys(layout: StoreLayout) -> list[str]:
    truth = [TRUTH_INDICES, TRUTH_VALUES] if layout.truth else []
    return [f"{ACTS}/{h}" for h in layout.hooks] + [TOKENS, POSITIONS] + truth


def array_spec(layout: StoreLayout, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(row shape, stored dtype) of one array of the store."""
    if key.startswith(ACTS + "/"):
        return (layout.hooks[key[len(ACTS) + 1 :]],), np.dtype(np.uint16)
    if key == TRUTH_INDICES:
        return (layout.truth,), np.dtype(np.int32)
    if key == TRUTH_VALUES:
        return (layout.truth,), np.dtype(np.float32)
    return (), np.dtype(np.int32)


def shard_files(layout: StoreLayout, index: int) -> dict[str, str]:
    """array key -> path (relative to the store) of that array's file of shard `index`."""
    return {key: shard_key(key, 1 + len(array_spec(layout, key)[0]), index) for key in array_keys(layout)}


def metadata_files(layout: StoreLayout) -> list[str]:
    """The zarr.json files of a store, the group's last: a copy or upload that writes them in
    this order after every shard makes the store visible (and complete) only at its last write."""
    arrays = [f"{key}/zarr.json" for key in array_keys(layout)]
    truth = [f"{TRUTH}/zarr.json", TRUTH_FEATURES] if layout.truth else []
    return arrays + [f"{ACTS}/zarr.json", *truth, "zarr.json"]


def array_meta_problem(layout: StoreLayout, key: str, doc: Any, n_rows: int | None) -> str | None:
    """What is wrong with array `key`'s zarr.json `doc` (parsed JSON) for a store of this layout
    and `n_rows` rows (None: a store still being written, whose shape is its capacity), or None:
    an array node of the right data type, shape and shard and chunk shapes, which readers trust."""
    row, dtype = array_spec(layout, key)
    if not isinstance(doc, dict) or doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
        return "not an array's zarr v3 metadata"
    if doc.get("data_type") != dtype.name:
        return f"data type {doc.get('data_type')!r}, not {dtype.name!r}"
    shape = doc.get("shape")
    if not (isinstance(shape, list) and shape[1:] == list(row) and (n_rows is None or shape[:1] == [n_rows])):
        want = [n_rows if n_rows is not None else "rows", *row]
        return f"shape {shape}, not {want}"
    grid = (doc.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    if grid != [layout.shard_rows, *row]:
        return f"shard shape {grid}, not {[layout.shard_rows, *row]}"
    codecs = doc.get("codecs") or [{}]
    inner = (
        codecs[0].get("configuration", {}).get("chunk_shape") if codecs[0].get("name") == "sharding_indexed" else None
    )
    if inner is not None and inner != [layout.chunk_rows, *row]:
        return f"chunk shape {inner}, not {[layout.chunk_rows, *row]}"
    return None


def is_metadata_name(name: str) -> bool:
    """True for the name of a zarr.json the store format defines: the group's, the `acts` group's,
    or one array's (`acts/<hook>/zarr.json` for a valid hook name, tokens', positions')."""
    if name in ("zarr.json", f"{ACTS}/zarr.json", f"{TOKENS}/zarr.json", f"{POSITIONS}/zarr.json"):
        return True
    if name in (f"{TRUTH}/zarr.json", f"{TRUTH_INDICES}/zarr.json", f"{TRUTH_VALUES}/zarr.json", TRUTH_FEATURES):
        return True
    head, _, tail = name.rpartition("/")
    return tail == "zarr.json" and head.startswith(ACTS + "/") and hook_name_ok(head[len(ACTS) + 1 :])


def identity(layout: StoreLayout, meta: dict) -> dict:
    """What a store is (format, provenance, layout): the part of its attributes fixed at creation.
    A store with ground truth has `truth` (its slots per row) too; others have no such key."""
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "hooks": layout.hooks,
        "shard_rows": layout.shard_rows,
        "chunk_rows": layout.chunk_rows,
    }
    return {**out, "truth": layout.truth} if layout.truth else out


# ---------------------------------------------------------------------------------------------
# attributes


def read_attrs(path: str | os.PathLike) -> dict | None:
    """The group attributes of a saekit store at a local `path`; None if there is no zarr.json there
    or another program's. A zarr.json that cannot be parsed is damaged: a one-line error saying
    so (and what to do), never "not a store"."""
    return read_group_attrs(Path(path), FORMAT, what="a saekit store", redo="harvest again")


def location_attrs(where: Any) -> dict | None:
    """`read_attrs` of the store at a `saekit.store.location.Location` (a directory or a URL)."""
    data = where.read_bytes("zarr.json")
    return None if data is None else attrs_of(data, where.url)


def attrs_of(data: bytes, where: str) -> dict | None:
    """`read_attrs` for the bytes of a store's zarr.json read elsewhere (object storage at `where`)."""
    return group_attrs(data, where, FORMAT, what="a saekit store", redo="harvest again")


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v: Any) -> str:
    return json.dumps(v)[:40]


class _Damaged:
    """Raises the one line a damaged attribute gives: which store, what is wrong, what to do."""

    def __init__(self, where: Any) -> None:
        self.where = where

    def __call__(self, what: str) -> NoReturn:
        raise SaekitError(f"store {self.where} has damaged attributes: {what}; restore zarr.json or re-harvest")


def check_attrs(where: Any, attrs: dict) -> StoreLayout:
    """Check a store's attributes for type and consistency; return its layout. A hand-edited or
    damaged zarr.json gives one line, never a traceback or a path outside the store."""
    fail = _Damaged(where)
    v = attrs.get("format_version")
    if not (_is_int(v) and v >= 1):
        fail(f"format_version is {_show(v)}, not a positive integer")
    if v > FORMAT_VERSION:
        raise SaekitError(f"{where} has store format {v}; upgrade saekit to read it")
    hooks = attrs.get("hooks")
    if not (isinstance(hooks, dict) and len(hooks) > 0):
        fail(f"hooks is {_show(hooks)}, not a map of hook name -> d_model")
    for h, d in hooks.items():
        if not hook_name_ok(h):
            fail(f"hook name {h!r} is not an array name inside the store")
        if not (_is_int(d) and d > 0):
            fail(f"hook {h!r} has d_model {_show(d)}, not a positive integer")
    s, c = attrs.get("shard_rows"), attrs.get("chunk_rows")
    if not (_is_int(s) and _is_int(c) and c > 0 and s > 0 and s % c == 0):
        fail(f"shard_rows {_show(s)} is not a positive multiple of chunk_rows {_show(c)}")
    if not isinstance(attrs.get("meta"), dict):
        fail(f"meta is {_show(attrs.get('meta'))}, not a map")
    if not isinstance(attrs.get("complete"), bool):
        fail(f"complete is {_show(attrs.get('complete'))}, not true/false")
    truth = attrs.get("truth", 0)
    if not (_is_int(truth) and 0 <= truth <= 2**16):
        fail(f"truth is {_show(truth)}, not the number of true-code slots per row")
    layout = StoreLayout(dict(hooks), s, c, truth)
    if attrs["complete"]:
        _check_summary(attrs, layout, fail)
    return layout


def _check_summary(attrs: dict, layout: StoreLayout, fail: _Damaged) -> None:
    """The attributes finalize writes: row count, per-shard checksums, statistics, content hash."""
    n = attrs.get("n_rows")
    if not (_is_int(n) and n > 0):
        fail(f"n_rows is {_show(n)}, not a positive integer")
    s = layout.shard_rows
    shards = attrs.get("shards")
    if not (isinstance(shards, list) and len(shards) == math.ceil(n / s)):
        fail(f"shards is {_show(shards)}, not one record per shard of {n} rows")
    keys = array_keys(layout)
    for i, r in enumerate(shards):
        ok = isinstance(r, dict) and all(_is_int(r.get(k)) for k in ("index", "start", "stop"))
        ok = ok and (r["index"], r["start"], r["stop"]) == (i, i * s, min((i + 1) * s, n))
        ok = ok and isinstance(r.get("crc32c"), dict) and all(_is_int(r["crc32c"].get(k)) for k in keys)
        if not ok:
            fail(f"shards[{i}] is not the record of shard {i}")
    stats = attrs.get("stats")
    if not isinstance(stats, dict):
        fail(f"stats is {_show(stats)}, not a map of hook -> statistics")
    for h, d in layout.hooks.items():
        st = stats.get(h)
        mean = st.get("mean") if isinstance(st, dict) else None
        if not (isinstance(mean, list) and len(mean) == d and all(map(_is_num, mean))):
            fail(f"stats of hook {h!r} are not a mean of {d} numbers and a mean_sq_norm")
        if not (isinstance(st, dict) and _is_num(st.get("mean_sq_norm"))):
            fail(f"stats of hook {h!r} are not a mean of {d} numbers and a mean_sq_norm")
    if not isinstance(attrs.get("content_hash"), str):
        fail(f"content_hash is {_show(attrs.get('content_hash'))}, not a string")


def content_hash(attrs: dict) -> str:
    """The content hash of a complete store, from its attributes: sha256 of the canonical JSON of
    format, meta, hooks, layout, n_rows, the per-shard checksums and (format 2 on) the statistics.

    No timestamps, ranks or resume history go in: equal content gives an equal hash.
    """
    keys = HASHED + (HASHED_SINCE_2 if attrs["format_version"] >= 2 else ()) + (("truth",) if "truth" in attrs else ())
    # NaN statistics (from NaN rows) are kept as JSON's NaN; format 1 never hashed any.
    doc = json.dumps({k: attrs[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def summary(layout: StoreLayout, meta: dict, recs: Sequence[ShardRecord], n_rows: int) -> dict:
    """The attributes of a finished store: identity, row count, stats, per-shard checksums, content hash."""
    shards = [{"index": r.index, "start": r.start, "stop": r.stop, "crc32c": r.crc32c} for r in recs]
    attrs = {
        **identity(layout, meta),
        "complete": True,
        "n_rows": n_rows,
        "stats": combined_stats(layout, recs, n_rows),
        "shards": shards,
    }
    return {**attrs, "content_hash": content_hash(attrs)}


# ---------------------------------------------------------------------------------------------
# completion records of a store being written


def _record_ok(r: ShardRecord, layout: StoreLayout) -> bool:
    """A completion record with the fields and types the writer writes (else: redo the shard)."""
    s = layout.shard_rows
    ok = r.index >= 0 and r.start == r.index * s and r.start < r.stop <= r.start + s
    ok = ok and all(_is_int(r.crc32c.get(k)) for k in array_keys(layout))
    sums, sq = r.extra.get("sums"), r.extra.get("sq_norms")
    if not (ok and isinstance(sums, dict) and isinstance(sq, dict)):
        return False
    return all(
        isinstance(sums.get(h), list) and len(sums[h]) == d and _is_num(sq.get(h)) for h, d in layout.hooks.items()
    )


def store_records(root: Path, layout: StoreLayout) -> dict[int, ShardRecord]:
    """Per-shard completion records on disk; unreadable or malformed ones count as missing (redo the shard)."""
    return check_records(read_records(root / RECORDS_DIR), layout)


def check_records(recs: dict[int, ShardRecord], layout: StoreLayout) -> dict[int, ShardRecord]:
    """The records with the fields and types the writer writes (the others: redo the shard)."""
    return {i: r for i, r in recs.items() if _record_ok(r, layout)}


def leading_records(recs: dict[int, ShardRecord], shard_rows: int) -> list[ShardRecord]:
    """The records of shards 0, 1, ... up to the first missing one, or the first partial one (included)."""
    order: list[ShardRecord] = []
    while (r := recs.get(len(order))) is not None:
        order.append(r)
        if r.stop - r.start < shard_rows:
            break
    return order

"""Writing an activation store: `create_store` and `StoreWriter` (whole shards, resume, several ranks).

Writers fill whole shards (one file write per shard, `saekit.store.shards`) and, after a shard's data,
atomically write a small JSON record with its checksums and statistics. A shard without a record
is redone on resume, so a killed writer never leaves a shard that looks complete. Rank r of w
writers owns shards i with i % w == r, so separate processes never touch the same file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from saekit.atomic import write_atomic
from saekit.config import check_positive
from saekit.errors import SaekitError
from saekit.store.format import (
    ACTS,
    BF16_ATTRS,
    FORMAT,
    POSITIONS,
    TOKENS,
    TRUTH,
    TRUTH_FEATURES,
    TRUTH_INDICES,
    TRUTH_VALUES,
    StoreLayout,
    array_keys,
    array_spec,
    bf16_bits,
    canonical_json,
    check_attrs,
    identity,
    is_url,
    leading_records,
    read_attrs,
    record_sums,
    row_stats,
    shard_files,
    store_records,
    summary,
    validate_hooks,
)
from saekit.store.remote import is_remote
from saekit.store.shards import (
    RECORDS_DIR,
    ShardLayoutError,
    ShardRecord,
    crc32c_of,
    create_marked_group,
    create_sharded_array,
    map_shard_file,
    record_path,
    write_group_attrs,
    write_json_atomic,
    write_recorded_shard,
)
from saekit.store.upload import InPlace, RemoteMirror, publisher

if TYPE_CHECKING:
    import zarr

# What a creation of a store makes in its directory (beside zarr.json and the marker).
STORE_ENTRIES = (ACTS, TOKENS, POSITIONS, TRUTH)


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
    staging: str | os.PathLike | None = None,
    truth: int = 0,
    truth_features: bytes = b"",
) -> StoreWriter:
    """Create (or resume) a store at a local `path` or an fsspec URL and return its writer.

    hooks: hook name -> d_model. n_rows: capacity, an upper bound (finalize may truncate; a single
    writer grows it if exceeded). meta: JSON provenance (model, dataset, tokenizer, ctx_len, ...).
    A non-empty `path` is refused unless `resume` (meta and layout must match what is stored; the
    finished shards of this writer are checked against their records and bad ones redone) or
    `overwrite` (only an existing saekit store is removed). What a creation killed before its
    attributes were written left behind holds no rows and is replaced. With world_size > 1, rank 0
    creates the store and the other ranks join it afterwards (the caller barriers between).

    At a URL (s3://, gs://, ...) the store is staged in a local folder (`staging`, default
    `saekit.store.upload.default_staging()`) and published piece by piece: see `saekit.store.upload`.

    A store with ground truth (a synthetic one) has `truth` slots of true codes per row (written
    with each shard: `write_shard(..., truth=codes)`) and `truth_features`, the safetensors bytes of
    its true feature directions, whose sha256 its meta holds (`meta["synthetic"]["features_sha256"]`).
    """
    _check_create_args(path, resume, overwrite, rank, world_size, shard_rows, chunk_rows, n_rows)
    layout = StoreLayout(validate_hooks(hooks), int(shard_rows), int(chunk_rows), int(truth))
    if truth and not truth_features:
        raise SaekitError("a store with ground truth needs its true features (truth_features)")
    meta = json.loads(canonical_json(meta))  # normalise (tuples -> lists) so resume compares like with like
    place = publisher(path, rank, staging, STORE_ENTRIES, FORMAT)
    try:
        non_empty = place.open_existing(rank, layout)
        attrs = read_attrs(place.root) if non_empty else None
        if (kept := _to_reopen(place.where, attrs, non_empty, resume, overwrite, rank)) is not None:
            return _reopen(kept, layout, meta, rank, world_size, place)
        if non_empty:
            place.clear_all()
        attrs = _create(place.root, layout, meta, capacity=int(n_rows), truth_features=truth_features)
        place.push_metadata(layout)
    except BaseException:
        place.done()
        raise
    return StoreWriter(place.root, layout, attrs, rank, world_size, place)


def _to_reopen(where, attrs: dict | None, non_empty: bool, resume: bool, overwrite: bool, rank: int) -> dict | None:
    """The attributes of the store at `where` to reopen (resume, or rank > 0), or None: (re)create
    it. Refuses, in one line, what neither may do."""
    if rank > 0:
        if attrs is None:
            raise SaekitError(
                f"rank {rank}: no store at {where} yet; rank 0 must call create_store first (barrier after it)"
            )
        return attrs
    if not non_empty:
        return None
    if not (resume or overwrite):
        what = "a saekit store" if attrs is not None else "not empty"
        raise SaekitError(
            f"{where} is {what}; pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to replace it, or choose a new path"
        )
    if attrs is None:
        why = "refusing to delete it" if overwrite else "cannot resume it"
        raise SaekitError(f"{where} is not empty and not a saekit store; {why}, choose a new path")
    return attrs if resume else None


def _check_create_args(
    path: str | os.PathLike,
    resume: bool,
    overwrite: bool,
    rank: int,
    world_size: int,
    shard_rows: int,
    chunk_rows: int,
    n_rows: int,
) -> None:
    if is_url(path) and not is_remote(path):
        raise SaekitError(
            f"{path}: write a store to a local path (not a file:// URL) or to object storage (s3://, gs://, ...)"
        )
    if resume and overwrite:
        raise SaekitError("pass either resume or overwrite, not both")
    if sys.byteorder != "little":  # shard files are written as raw little-endian bytes
        raise SaekitError("writing stores needs a little-endian machine (x86-64, arm64)")
    if not 0 <= rank < world_size:
        raise SaekitError(f"rank {rank} is outside 0..{world_size - 1}")
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise SaekitError(f"shard_rows ({shard_rows}) must be a positive multiple of chunk_rows ({chunk_rows})")
    check_positive("n_rows (capacity)", n_rows)


def _reopen(
    attrs: dict, layout: StoreLayout, meta: dict, rank: int, world_size: int, place: InPlace | RemoteMirror
) -> StoreWriter:
    """A writer of the unfinished store at `place` (resume, or rank > 0 joining rank 0's store)."""
    where = place.where
    stored = check_attrs(where, attrs)
    if attrs["complete"] and rank > 0:
        raise SaekitError(
            f"rank {rank}: store {where} is already complete; nothing to write (overwrite it from rank 0 to rebuild)"
        )
    if attrs["complete"]:
        raise SaekitError(
            f"store {where} is already complete ({attrs['n_rows']} rows); open it to read, or pass overwrite to rebuild"
        )
    _check_matches(where, stored, attrs["meta"], layout, meta)
    return StoreWriter(place.root, layout, attrs, rank, world_size, place)


def _check_matches(root, stored: StoreLayout, stored_meta: dict, layout: StoreLayout, meta: dict) -> None:
    if stored != layout:
        raise SaekitError(
            f"store {root} has layout {tuple(stored)} but this run asks for {tuple(layout)}; use the same hooks/shard sizes or a new path"
        )
    if canonical_json(stored_meta) != canonical_json(meta):
        old, new = stored_meta, meta
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise SaekitError(
            f"store {root} was written with different metadata (differs in: {', '.join(keys)}); resume with the same settings or use a new path"
        )


def _create(root: Path, layout: StoreLayout, meta: dict, capacity: int, truth_features: bytes = b"") -> dict:
    """An empty store at `root` with room for `capacity` rows; returns its attributes."""
    attrs = {**identity(layout, meta), "complete": False, "n_rows": None}
    sharding = {"shard_rows": layout.shard_rows, "chunk_rows": layout.chunk_rows}

    def build(group) -> None:
        acts = group.create_group(ACTS)
        for hook, d in layout.hooks.items():
            create_sharded_array(
                acts, hook, (capacity, d), "uint16", **sharding, attrs={**BF16_ATTRS, "hook": hook, "d_model": d}
            )
        for name, what in ((TOKENS, "token id"), (POSITIONS, "position in sequence")):
            create_sharded_array(
                group, name, (capacity,), "int32", **sharding, attrs={"description": f"{what} of every row"}
            )
        if layout.truth:  # a synthetic store's ground truth: every row's true code, the true features
            truth = group.create_group(TRUTH)
            for key, dtype, what in ((TRUTH_INDICES, "int32", "feature"), (TRUTH_VALUES, "float32", "activation")):
                about = {"description": f"true {what} of each of the row's active features (slot value 0: free)"}
                name = key.split("/", 1)[1]
                create_sharded_array(truth, name, (capacity, layout.truth), dtype, **sharding, attrs=about)
            write_atomic(root / TRUTH_FEATURES, truth_features)

    note = "saekit is creating a store here; if no harvest is running, rerun it with --resume\n"
    create_marked_group(root, attrs, build, note)
    return attrs


def _shard_problem(root: Path, layout: StoreLayout, rec: ShardRecord, place: InPlace | RemoteMirror) -> str | None:
    """What is wrong with a finished shard a writer before this one recorded, or None: each
    array's file must be there (a bucket's is fetched into staging, then freed) and its record must
    be its rows' own, the crc32c of every array and the statistics recomputed from the rows. Used
    on resume, so a finished store verifies; readers check through ActivationStore._load."""
    try:
        fresh = record_from_files(root, layout, rec.index, rec.stop - rec.start, place)
    except (FileNotFoundError, SaekitError) as e:
        return f"shard {rec.index}: missing ({e if isinstance(e, SaekitError) else e.filename})"
    except (OSError, ShardLayoutError) as e:
        return f"shard {rec.index}: unreadable ({type(e).__name__})"
    finally:
        place.free(shard_files(layout, rec.index).values())
    for key, name in shard_files(layout, rec.index).items():
        if fresh.crc32c[key] != rec.crc32c.get(key):
            return f"{name}: corrupt (checksum mismatch)"
    if any(fresh.extra[k] != rec.extra.get(k) for k in fresh.extra):
        return f"shard {rec.index}: its record's statistics are not its rows'"
    return None


class Kept(NamedTuple):
    """Rows of a store being extended that are copied into its rewritten last shard."""

    index: int  # the shard
    arrays: dict[str, np.ndarray]  # array key -> its first rows, as stored (bf16 bits, int32)


class StoreWriter:
    """Writes whole shards of a store; see `create_store`.

    `append` fills this writer's shards in order (for rank r of w: shards r, r+w, r+2w, ...);
    `write_shard` writes one explicitly. `resume_row` counts the rows of this writer's stream that
    are already safely on disk (leading complete shards); the caller continues from there.
    `damaged` lists this writer's finished shards that failed their check on opening (redone);
    shards in `trusted` were checked just before and are not read again.
    """

    def __init__(
        self,
        root: Path,
        layout: StoreLayout,
        attrs: dict,
        rank: int,
        world_size: int,
        place: InPlace | RemoteMirror,
        trusted: Collection[int] = (),
        grows: bool = False,
    ):
        import zarr  # lazy: zarr takes about a second to import and `saekit --help` must stay fast

        self.path = root  # where the files are written (a staging folder for a URL store)
        self.place = place  # where the store is published (in place, or a bucket), and its lock
        self.where = place.where  # the store, as the user named it
        self.kept: Kept | None = None  # see extend_store
        self._grows = grows  # extending a complete store: its arrays' shape changes only at finalize
        self.layout = layout
        self.meta = attrs["meta"]
        self.rank, self.world_size = rank, world_size
        self._records = root / RECORDS_DIR
        self._group = zarr.open_group(str(root), mode="r+")
        self._arrays: dict[str, zarr.Array] = {}
        for key in array_keys(layout):
            a = self._group.get(key)
            if not isinstance(a, zarr.Array):
                raise SaekitError(
                    f"store {root} has no array '{key}'; it is damaged: re-harvest it with overwrite (--overwrite)"
                )
            self._arrays[key] = a
        self._records.mkdir(exist_ok=True)
        done = store_records(root, layout)
        self.damaged = self._drop_damaged({i: r for i, r in done.items() if i not in trusted}, done)
        # leading full shards of this writer's stream are kept; the first gap (or partial) is redone.
        k = 0
        while (rec := done.get(self._global_shard(k))) is not None and rec.stop - rec.start == layout.shard_rows:
            k += 1
        self._next_local = k
        self.resume_row = k * layout.shard_rows
        self._buf = self._new_buffer()
        self._fill = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-stats")

    def _drop_damaged(self, check: dict[int, ShardRecord], done: dict[int, ShardRecord]) -> list[str]:
        """Check this writer's finished shards in `check` against their records (files there,
        crc32c of the valid rows) and drop the record of each bad one from `done` and the disk, so
        it is redone. One line per bad shard."""
        bad = []
        for i in sorted(j for j in check if j % self.world_size == self.rank):
            problem = None
            # a bucket's sizes first: a short or missing object is known without a download
            problem = self.place.shard_problem(self.layout, check[i], self.place.objects_at_open)
            problem = problem or _shard_problem(self.path, self.layout, check[i], self.place)
            if problem is not None:
                record_path(self._records, i).unlink(missing_ok=True)
                self.place.drop_record(i)
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
        buf: dict[str, np.ndarray] = {f"{ACTS}/{h}": np.zeros((s, d), np.uint16) for h, d in self.layout.hooks.items()}
        buf[TOKENS] = np.zeros(s, np.int32)
        buf[POSITIONS] = np.zeros(s, np.int32)
        return buf

    def _convert(self, acts: dict, tokens, positions) -> tuple[dict[str, np.ndarray], int]:
        """Validate one batch and convert it to the stored dtypes. Returns (array key -> rows, n)."""
        hooks = self.layout.hooks
        if set(acts) != set(hooks):
            raise SaekitError(f"append got hooks {sorted(acts)} but the store has {sorted(hooks)}; pass exactly those")
        out = {}
        n = -1  # rows in the batch: the first hook's, which every other hook must match
        for h, d in hooks.items():
            x = acts[h]
            if x.ndim != 2 or x.shape[1] != d:
                raise SaekitError(
                    f"hook {h!r}: rows have shape {tuple(x.shape)} but the store holds [n, {d}]; pass [n, d_model] activations of that hook"
                )
            n = x.shape[0] if n < 0 else n
            if x.shape[0] != n:
                raise SaekitError(
                    f"hook {h!r} has {x.shape[0]} rows but other hooks have {n}; pass the same rows for every hook"
                )
            out[f"{ACTS}/{h}"] = bf16_bits(x)
        for key, v in ((TOKENS, tokens), (POSITIONS, positions)):
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if v.shape != (n,):
                raise SaekitError(f"{key} has shape {v.shape} but there are {n} rows; pass one {key[:-1]} per row")
            out[key] = v.astype(np.int32)
        return out, n

    def append(self, acts: dict[str, torch.Tensor | np.ndarray], tokens, positions) -> None:
        """Add rows. acts: hook -> [n, d_model] floats (stored as bf16); tokens, positions: [n] ints."""
        if self.layout.truth:
            raise SaekitError("a store with ground truth is written shard by shard: write_shard(..., truth=codes)")
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
        self.place.done()  # a bucket's: everything this writer staged is in it

    def write_shard(
        self, index: int, acts: dict[str, torch.Tensor | np.ndarray], tokens, positions, truth: Any = None
    ) -> None:
        """Write shard `index` whole (its rows: at most shard_rows; fewer only for the store's last shard).
        truth: with ground truth, the rows' true codes (`.indices`, `.values` [n, layout.truth])."""
        if index % self.world_size != self.rank:
            raise SaekitError(
                f"shard {index} belongs to rank {index % self.world_size}, not rank {self.rank} of {self.world_size}"
            )
        data, n = self._convert(acts, tokens, positions)
        data.update(self._truth(truth, n))
        if not 0 < n <= self.layout.shard_rows:
            raise SaekitError(f"a shard holds 1..{self.layout.shard_rows} rows, got {n}; split the rows into shards")
        self._write(index, data, n)

    def _truth(self, truth: Any, n: int) -> dict[str, np.ndarray]:
        """The true-code arrays of n rows, checked against the layout ({} without ground truth)."""
        w = self.layout.truth
        if (truth is None) != (w == 0):
            what = "has no ground truth" if w == 0 else f"keeps {w} true-code slots per row"
            raise SaekitError(f"the store {what}: pass truth= exactly when it does")
        if truth is None:
            return {}
        out = {}
        for key, v, dtype in ((TRUTH_INDICES, truth.indices, np.int32), (TRUTH_VALUES, truth.values, np.float32)):
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if v.shape != (n, w):
                raise SaekitError(f"{key} has shape {v.shape}, not [{n}, {w}]: one row of {w} slots per row")
            out[key] = v.astype(dtype)
        return out

    def shard_done(self, index: int) -> bool:
        """True when shard `index` has a completion record (full or partial) on disk."""
        return record_path(self._records, index).exists()

    def _write(self, index: int, data: dict[str, np.ndarray], n: int) -> None:
        self._ensure_capacity(index * self.layout.shard_rows + n)
        hooks = list(self.layout.hooks)
        # statistics in a helper thread while this one writes files: both release the GIL.
        stats = self._pool.map(lambda h: row_stats(data[f"{ACTS}/{h}"][:n]), hooks)
        write_recorded_shard(
            self.path,
            self._records,
            index,
            data,
            n,
            shard_rows=self.layout.shard_rows,
            chunk_rows=self.layout.chunk_rows,
            extra=lambda: record_sums(dict(zip(hooks, stats, strict=True))),
        )
        self.place.push_shard(self.layout, index)

    def _ensure_capacity(self, rows: int) -> None:
        if rows <= self.capacity or self._grows:  # shard files are saekit's own: the shape is metadata
            return
        if self.world_size > 1:
            raise SaekitError(
                f"rows up to {rows} exceed the store's capacity {self.capacity}; with several writers pass a large enough n_rows to create_store"
            )
        new = max(rows, 2 * self.capacity)
        for a in self._arrays.values():
            a.resize((new, *a.shape[1:]))

    def finalize(self, n_rows: int | None = None) -> dict:
        """Flush, optionally truncate to `n_rows`, combine statistics, hash and mark complete.
        Returns the store's attributes.

        With several writers, only rank 0 calls this, after every rank has written (barrier first).
        """
        if self.rank != 0:
            raise SaekitError(f"only rank 0 finalizes a store; rank {self.rank} should stop after writing and barrier")
        self._flush()
        self.place.pull_records()  # a bucket's: the other ranks' shards
        order = self._finished_shards()
        total = order[-1].stop if order else 0
        if n_rows is not None:
            if n_rows > total:
                raise SaekitError(
                    f"finalize(n_rows={n_rows}) but only {total} rows are written; write more rows or pass fewer"
                )
            total = int(n_rows)
        if total == 0:
            raise SaekitError(f"store {self.where} has no rows; append rows before finalize")
        order = [r for r in order if r.start < total]
        self.place.refuse_truncation(order[-1].stop, total)
        if order[-1].stop > total:  # truncating inside a shard: its checksums and stats change
            order[-1] = self._record_from_disk(order[-1], total)
        for a in self._arrays.values():
            a.resize((total, *a.shape[1:]))
        attrs = read_attrs(self.path) or {}
        attrs.update(summary(self.layout, self.meta, order, total))  # format, version and hash with it
        write_group_attrs(self.path, attrs)
        self._pool.shutdown()
        self.place.finished(self.layout)  # a bucket's group zarr.json, complete, is the last object written
        return attrs

    def _finished_shards(self) -> list[ShardRecord]:
        """The records of the store's shards in order; an error naming the gap if any shard before the last is missing or partial."""
        recs = store_records(self.path, self.layout)
        order = leading_records(recs, self.layout.shard_rows)
        last = order[-1].index if order else -1
        later = sorted(j for j in recs if j > last)
        if later:
            if order and order[-1].stop - order[-1].start < self.layout.shard_rows:
                why = f"shard {last} is partial"
            else:
                why = f"shards {sorted(set(range(last + 1, later[-1] + 1)) - set(recs))} have no completion record"
            raise SaekitError(
                f"store {self.where} has a gap: {why} but later shards exist; rerun the writers with resume, then finalize"
            )
        return order

    def _record_from_disk(self, rec: ShardRecord, stop: int) -> ShardRecord:
        return record_from_files(self.path, self.layout, rec.index, stop - rec.start)


def record_from_files(
    root: Path, layout: StoreLayout, index: int, n_valid: int, place: InPlace | RemoteMirror | None = None
) -> ShardRecord:
    """The completion record of shard `index` rebuilt from its files' first `n_valid` rows
    (checksums and statistics, as the writer computed them; a bucket's files are fetched into
    staging where they are not there). Raises ShardLayoutError / OSError / SaekitError."""
    crc, stats = {}, {}
    for key, v in _shard_arrays(root, layout, index, n_valid, place).items():
        crc[key] = crc32c_of(v)
        if key.startswith(ACTS + "/"):
            stats[key[len(ACTS) + 1 :]] = row_stats(v)
    start = index * layout.shard_rows
    return ShardRecord(index, start, start + n_valid, crc, record_sums(stats))


def extend_store(
    path: str | os.PathLike,
    layout: StoreLayout,
    *,
    n_rows: int,
    meta: dict,
    rank: int = 0,
    world_size: int = 1,
    staging: str | os.PathLike | None = None,
) -> StoreWriter:
    """A writer that grows the COMPLETE store at `path` to `n_rows` rows under the metadata `meta`
    (the caller has checked that its rows are the same as the store's: see saekit.store.cache_root).

    Its full shards are kept (their records rebuilt from the files, each checked against the
    store's crc32c; a bad one is redone). Its last, partial shard is rewritten with more rows: its
    old rows are read back (checked) and handed to the caller as `writer.kept`, so they are copied,
    never recomputed. Nothing of the complete store changes before finalize (not even the arrays'
    shape), which replaces its attributes in one write.
    """
    place = publisher(path, rank, staging, STORE_ENTRIES, FORMAT)
    try:
        return _extend(place, path, layout, n_rows, meta, rank, world_size)
    except BaseException:
        place.done()
        raise


def _extend(
    place: InPlace | RemoteMirror,
    path: str | os.PathLike,
    layout: StoreLayout,
    n_rows: int,
    meta: dict,
    rank: int,
    world_size: int,
) -> StoreWriter:
    place.pull_all()
    root = place.root
    attrs = read_attrs(root)
    if attrs is None or not attrs.get("complete"):
        raise SaekitError(f"{path} is not a complete store, so it cannot be extended; harvest it with --resume")
    stored = check_attrs(path, attrs)
    if stored != layout:
        raise SaekitError(f"store {path} has layout {tuple(stored)}, not {tuple(layout)}; it cannot be extended")
    if n_rows <= attrs["n_rows"]:
        raise SaekitError(f"store {path} already has {attrs['n_rows']} rows; nothing to extend to {n_rows}")
    trusted: set[int] = set()
    if rank == 0:
        # the old last shard is rewritten with more rows; a killed earlier extension may have
        # written shards past this request's end
        for i, r in store_records(root, layout).items():
            if r.stop - r.start < layout.shard_rows or r.stop > n_rows:
                record_path(root / RECORDS_DIR, i).unlink()
                place.drop_record(i)
        trusted = _adopt_full_shards(root, layout, attrs, place)
    writer = StoreWriter(root, layout, {**attrs, "meta": meta}, rank, world_size, place, trusted, grows=True)
    last = attrs["shards"][-1]
    if last["index"] % world_size == rank and last["stop"] - last["start"] < layout.shard_rows:
        writer.kept = _kept_rows(root, layout, last, place)
    return writer


def _shard_arrays(
    root: Path, layout: StoreLayout, index: int, n_valid: int, place: InPlace | RemoteMirror | None
) -> dict[str, np.ndarray]:
    """array key -> the first `n_valid` rows of shard `index` (a bucket's shard is fetched into staging)."""
    out = {}
    for key, name in shard_files(layout, index).items():
        if place is not None:
            place.fetch(name)
        row, dtype = array_spec(layout, key)
        out[key] = map_shard_file(root / name, (layout.shard_rows, *row), layout.chunk_rows, dtype, n_valid)
    return out


def _kept_rows(root: Path, layout: StoreLayout, shard: dict, place: InPlace | RemoteMirror) -> Kept | None:
    """The rows of a complete store's partial last shard, checked against its recorded crc32c
    (None when they cannot be read or do not match: then they are computed again)."""
    try:
        arrays = _shard_arrays(root, layout, shard["index"], shard["stop"] - shard["start"], place)
    except (OSError, ShardLayoutError, SaekitError):
        return None
    if any(crc32c_of(v) != shard["crc32c"][key] for key, v in arrays.items()):
        return None
    return Kept(shard["index"], {key: np.array(v) for key, v in arrays.items()})


def _adopt_full_shards(root: Path, layout: StoreLayout, attrs: dict, place: InPlace | RemoteMirror) -> set[int]:
    """Write a completion record for each full shard of a complete store that has none, rebuilt
    from its files (a bucket's are fetched into staging, then freed) and checked against the
    store's crc32c. A bucket gets the record too. Returns the shards checked here; a shard
    without a record is written again."""
    records = root / RECORDS_DIR
    records.mkdir(parents=True, exist_ok=True)
    have = store_records(root, layout)
    checked = set()
    for s in attrs["shards"]:
        if s["stop"] - s["start"] != layout.shard_rows or s["index"] in have:
            continue
        try:
            _shard_arrays(root, layout, s["index"], layout.shard_rows, place)
            rec = record_from_files(root, layout, s["index"], layout.shard_rows)
        except (OSError, ShardLayoutError, SaekitError):
            continue
        if rec.crc32c == s["crc32c"]:
            write_json_atomic(record_path(records, rec.index), rec.to_json())
            checked.add(rec.index)
            place.push_record(rec.index)
        place.free(shard_files(layout, s["index"]).values())
    return checked

"""Reading an activation store: `open_store` and `ActivationStore` (rows, shuffled batches, verify).

Readers memory-map each shard file after validating zarr's shard index (contiguous C-order inner
chunks, no compression) and fall back to zarr reads of whole shards (a small cache) when that check
fails or the store is a file:// URL. A store in object storage (s3://, gs://, ...; `saekit.store.remote`)
is read the same way from the local shard cache (`saekit.store.shard_cache`), which downloads each shard
file whole; its shuffled and sequential readers download the next shards ahead. Every path checks a
shard's crc32c against its record the first time it is touched, and a missing shard file is an
error, never zeros. The content hash covers the attributes (format 2: statistics included);
open_store recomputes it, so edited attributes are refused before any reader uses them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from saekit.atomic import is_regular
from saekit.config import check_positive
from saekit.errors import SaekitError
from saekit.store.format import (
    ACTS,
    FORMAT,
    POSITIONS,
    TOKENS,
    TRUTH_FEATURES,
    TRUTH_INDICES,
    TRUTH_VALUES,
    HookStats,
    StoreLayout,
    array_keys,
    array_meta_problem,
    array_spec,
    bits_to_bf16,
    check_attrs,
    check_records,
    combined_stats,
    content_hash,
    is_url,
    leading_records,
    metadata_files,
    read_attrs,
    record_sums,
    row_stats,
)
from saekit.store.location import Local, Location
from saekit.store.remote import Remote, is_remote, url_key
from saekit.store.shard_cache import BadFile, Prefetcher, ShardCache, ShardFetchError, shard_cache
from saekit.store.shards import (
    CREATING,
    RECORDS_DIR,
    ShardLayoutError,
    ShardRecord,
    crc32c_of,
    is_plain_sharded,
    map_shard_file,
    read_remote_records,
    shard_key,
)
from saekit.store.shuffle import batch_stream, shuffle_plan, skip_windows

FALLBACK_CACHE_BYTES = 512 << 20  # whole shards read through zarr are kept up to this size (at least 2)
# a remote store's sequential reader downloads this many shards ahead (shuffled: shuffle.AHEAD_WINDOWS)
AHEAD_SHARDS = 2
DOWNLOAD_THREADS = 4


class _BadShard(SaekitError):
    """A shard that cannot be read as recorded (missing, unreadable, checksum mismatch)."""

    def __init__(self, store: Any, name: str, what: str):
        verify = f"saekit verify {store}" if is_remote(store) else "saekit verify"
        super().__init__(
            f"store {store}: shard {name} is {what}; run `{verify}` to list every bad shard, then re-harvest or restore them"
        )
        self.name, self.what = name, what


def open_store(
    path_or_url: str | os.PathLike,
    *,
    allow_incomplete: bool = False,
    check: bool = True,
    cache_dir: str | os.PathLike = "",
    cache_gb: float | None = None,
) -> ActivationStore:
    """Open a store for reading: a local directory (memory-mapped), a store in object storage
    (s3://, gs://, ...: shard files downloaded into the local shard cache at `cache_dir`, bounded
    to `cache_gb` GiB, and memory-mapped; see `saekit.store.shard_cache`) or a file:// URL (zarr reads).

    The attributes are checked (types, and the content hash recomputed from them: no data read)
    before anything uses them. allow_incomplete: read the complete shards of a store still being
    written (or killed). check: every shard file of a local or remote store must be there now (a
    stat each, or one listing, so a stage fails before it writes anything), and each shard's crc32c
    is verified the first time it is touched (always, for a downloaded one). A missing shard file
    is an error on every read either way.
    """
    import zarr  # lazy: zarr takes about a second to import and `saekit --help` must stay fast

    cache = None
    where: Location
    if is_remote(path_or_url):
        where = Remote(str(path_or_url))
        root, group, attrs = None, None, _remote_attrs(where)
    elif is_url(path_or_url):  # file://: read through zarr, as another writer's store would be
        root, group, attrs = None, *_open_url(path_or_url)
        where = Remote(str(path_or_url))
    else:
        root, group, attrs = Path(path_or_url), None, _local_attrs(Path(path_or_url))
        where = Local(root)
    if attrs is None or attrs.get("format") != FORMAT:
        raise SaekitError(f"{path_or_url} is not a saekit activation store; pass the directory that harvest wrote")
    check_attrs(path_or_url, attrs)
    if not attrs["complete"] and not allow_incomplete:
        raise SaekitError(
            f"store {path_or_url} is incomplete (its writer did not finish); resume the harvest with --resume, or open it with allow_incomplete=True"
        )
    if attrs["complete"] and content_hash(attrs) != attrs["content_hash"]:
        raise SaekitError(
            f"store {path_or_url}: its attributes do not match its content hash (zarr.json was edited or damaged: "
            "metadata, statistics or checksums); restore zarr.json from a copy or re-harvest"
        )
    if root is not None:
        _check_metadata_files(root, check_attrs(path_or_url, attrs))  # before zarr opens any of them
        group = zarr.open_group(str(root), mode="r")
    if is_remote(path_or_url):
        cache = functools.partial(shard_cache, cache_dir, cache_gb)  # made at the first shard read
    store = ActivationStore(path_or_url, where, root, group, attrs, check, cache=cache)
    if check:
        store._cache  # noqa: B018 - a bad --cache-dir / --cache-gb fails now, before a stage writes anything
        store.check_files_present()
    return store


def _check_metadata_files(root: Path, layout: StoreLayout) -> None:
    """Each zarr.json of the store that is there is a regular file: zarr would block forever
    opening a FIFO put in one's place."""
    for name in metadata_files(layout):
        p = root / name
        if os.path.lexists(p) and not is_regular(p):
            raise SaekitError(
                f"store {root}: {name} is not a regular file (a FIFO or a device?); restore it from a copy"
            )


def _open_url(url: str | os.PathLike) -> tuple[Any, dict]:
    """(zarr group, its attributes) of a store at an fsspec URL."""
    import zarr  # lazy: see open_store

    try:
        group = zarr.open_group(str(url), mode="r")
        return group, group.attrs.asdict()
    except ValueError as e:  # zarr.json there but not JSON
        raise SaekitError(f"{url}/zarr.json is damaged (not valid JSON); restore it from a copy or re-harvest") from e
    except Exception as e:  # zarr/fsspec raise many types for "nothing there"
        raise SaekitError(f"cannot open {url} as a store ({type(e).__name__}); check the URL") from e


def _remote_attrs(remote: Remote) -> dict | None:
    """The group attributes of a store in object storage (its zarr.json, read directly)."""
    raw = remote.read_bytes("zarr.json")
    if raw is None:
        raise SaekitError(f"no store at {remote.url} (no zarr.json there); check the URL (harvest writes one)")
    try:
        doc = json.loads(raw)
    except ValueError:  # not JSON, not UTF-8
        doc = None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise SaekitError(
            f"{remote.url}/zarr.json is damaged (not a zarr group document); restore it from a copy or re-harvest"
        )
    return attrs


def _local_attrs(root: Path) -> dict | None:
    if not root.exists():
        raise SaekitError(f"no store at {root}; check the path (harvest writes one)")
    attrs = read_attrs(root)
    if attrs is None and (root / CREATING).is_file():
        raise SaekitError(
            f"creating the store at {root} was interrupted (it holds no rows); rerun the harvest with --resume or --overwrite"
        )
    return attrs


class ActivationStore:
    """Read access to a store: rows as torch bf16, sequential and shuffled iteration, verify."""

    def __init__(
        self,
        path,
        where: Location,
        root: Path | None,
        group,
        attrs: dict,
        check: bool,
        *,
        cache: Callable[[], ShardCache] | None = None,
    ):
        self.path = path
        self.meta: dict = attrs["meta"]
        self.layout = StoreLayout(
            dict(attrs["hooks"]), attrs["shard_rows"], attrs["chunk_rows"], attrs.get("truth", 0)
        )  # checked by open_store
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
        self._where = where  # its files: listed, sized and read without asking which kind it is
        self._make_cache = cache  # the shard cache of a store in object storage (None: local or file://)
        self._shard_cache = None
        self._in_bucket = cache is not None
        if self.complete:
            self.n_rows = int(attrs["n_rows"])
            self.content_hash: str = attrs["content_hash"]
            self._shards = {s["index"]: s for s in attrs["shards"]}
            self._stats = attrs["stats"]
        else:  # readable part of an unfinished store: leading complete shards
            order = leading_records(self._records(), self.layout.shard_rows)
            self.n_rows = order[-1].stop if order else 0
            self.content_hash = ""
            self._shards = {
                r.index: {"index": r.index, "start": r.start, "stop": r.stop, "crc32c": r.crc32c} for r in order
            }
            self._stats = combined_stats(self.layout, order, self.n_rows) if order else {}
        self._plain = {key: self._is_plain(key) for key in self._array_keys()}
        # the cache's folder for this store: its content names it (a store being written: its URL)
        self._cache_key = (
            self.content_hash.removeprefix("sha256:")[:16] if self.complete else f"url-{url_key(str(path))}"
        )

    @property
    def _cache(self) -> Any:
        """The shard cache, made at the first shard read (`info` and `ls` read none)."""
        if self._shard_cache is None and self._make_cache is not None:
            self._shard_cache = self._make_cache()
        return self._shard_cache

    def _records(self) -> dict[int, ShardRecord]:
        """Completion records of an unfinished store (local, or in object storage)."""
        return check_records(read_remote_records(self._where, RECORDS_DIR), self.layout)

    def _array_doc(self, key: str) -> Any:
        """The array's zarr.json, parsed (None where it cannot be read here: missing, not JSON, or a
        file:// store read through zarr)."""
        if self._root is None and not self._in_bucket:
            return None  # a file:// store: read through zarr, never memory-mapped
        try:
            return json.loads(self._where.read_bytes(f"{key}/zarr.json") or b"null")
        except (OSError, ValueError, SaekitError):
            return None

    def _is_plain(self, key: str) -> bool:
        """True when the array's shard files can be memory-mapped (saekit's layout, little-endian machine)."""
        doc = self._array_doc(key)
        return isinstance(doc, dict) and is_plain_sharded(doc) and sys.byteorder == "little"

    # -- small accessors ------------------------------------------------------------------------

    def _array_keys(self) -> list[str]:
        return array_keys(self.layout)

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
            raise SaekitError(
                f"store {self.path} has no complete shards yet, so no statistics; finish the harvest first"
            )
        s = self._stats[h]
        return HookStats(torch.tensor(s["mean"], dtype=torch.float32), float(s["mean_sq_norm"]))

    def size_on_disk(self) -> int | None:
        """Bytes of all files under a local store or in object storage (None for file:// URLs)."""
        if self._root is None and not self._in_bucket:
            return None
        return sum(self._where.list().values())

    # -- shard access ---------------------------------------------------------------------------

    def _shard_range(self, index: int) -> tuple[int, int]:
        s = self.layout.shard_rows
        return index * s, min((index + 1) * s, self.n_rows)

    def _array(self, key: str) -> Any:
        if self._group is None:  # a remote store's array in another writer's layout
            import zarr  # lazy: see open_store

            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group[key]

    def _view(self, key: str, index: int) -> np.ndarray:
        """The valid rows of one shard, checked the first time they are touched: memory-mapped
        (kept for the store's life; a remote store's while the shard cache holds the file) or
        read whole through zarr (kept in a small LRU cache)."""
        if self._in_bucket and self._plain[key]:
            return self._load(key, index, True)  # the cache keeps the mapping, and drops it on eviction
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

    def _load(self, key: str, index: int, check: bool, fresh: bool = False) -> np.ndarray:
        """Read one shard's valid rows: a memory map where the file's layout allows, else whole
        through zarr. Missing or unreadable files raise; so does a crc32c mismatch when `check`."""
        row, dtype = array_spec(self.layout, key)
        name = shard_key(key, 1 + len(row), index)
        start, stop = self._shard_range(index)
        if self._in_bucket and self._plain[key]:
            return self._fetch(key, index, name, fresh)
        try:
            size = self._file_size(name)
            if not size:  # zarr would read a missing or empty shard file as its fill value (zeros)
                raise _BadShard(self.path, name, "missing" if size is None else "empty (0 bytes)")
            v = None
            if self._root is not None and self._plain[key]:
                try:
                    v = map_shard_file(
                        self._root / name, (self.layout.shard_rows, *row), self.layout.chunk_rows, dtype, stop - start
                    )
                except ShardLayoutError:
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

    def _fetch(self, key: str, index: int, name: str, fresh: bool = False) -> np.ndarray:
        """One shard of a remote store through the shard cache: downloaded whole if need be,
        memory-mapped and checked against its crc32c (always: a download can be damaged)."""
        row, dtype = array_spec(self.layout, key)
        start, stop = self._shard_range(index)
        want = self._shards[index]["crc32c"][key]

        def open_checked(file: Path) -> np.ndarray:
            try:
                v = map_shard_file(file, (self.layout.shard_rows, *row), self.layout.chunk_rows, dtype, stop - start)
            except ShardLayoutError as e:
                raise BadFile("its shard index is damaged") from e
            if crc32c_of(v) != want:
                raise BadFile("checksum mismatch")
            return v

        try:
            return self._cache.get(self._where, name, self._cache_key, open_checked, (stop - start, want), fresh)
        except ShardFetchError as e:
            raise _BadShard(self.path, name, e.what) from None

    def check_files_present(self) -> None:
        """Raise for the first missing or empty shard file of a local store or a store in object
        storage (one listing); file:// URL stores: no-op, their shards are checked as they are read."""
        if self._root is None and not self._in_bucket:
            return
        listed = self._where.list()
        for index in sorted(self._shards):
            for key in self._array_keys():
                name = shard_key(key, 1 + len(array_spec(self.layout, key)[0]), index)
                size = listed.get(name)
                if not size:
                    raise _BadShard(self.path, name, "missing" if size is None else "empty (0 bytes)")

    def _file_size(self, name: str) -> int | None:
        """Bytes of a shard file, None when it is not there."""
        return self._where.size(name)

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
        row, dtype = array_spec(self.layout, key)
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

    # -- ground truth (a synthetic store) ------------------------------------------------------

    @property
    def has_truth(self) -> bool:
        """Whether the store keeps ground truth: each row's true code and the true features."""
        return self.layout.truth > 0

    def _need_truth(self) -> None:
        if not self.has_truth:
            raise SaekitError(
                f"store {self.path} has no ground truth (only a synthetic store has): "
                "harvest one with --model synthetic:cpu to measure recovery"
            )

    def truth_codes(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The true codes of rows [start, stop): (feature indices int64, activations float32), each
        [n, truth slots]; a slot holding activation 0 is free."""
        self._need_truth()
        indices = torch.from_numpy(np.asarray(self._read(TRUTH_INDICES, start, stop))).long()
        return indices, torch.from_numpy(np.array(self._read(TRUTH_VALUES, start, stop)))

    def truth_features(self) -> dict[str, torch.Tensor]:
        """The true feature directions (`features` [n_features, d]) and `bias` [d], checked against
        the sha256 the store's meta holds (so its content hash covers them)."""
        self._need_truth()
        from safetensors.torch import load  # lazy: only ground-truth reports read it

        data = self._where.read_bytes(TRUTH_FEATURES)
        problem = _features_problem(data, self.meta)
        if problem is not None:
            raise SaekitError(
                f"store {self.path}: its true features ({TRUTH_FEATURES}) are {problem}; restore them from a copy or harvest again"
            )
        return load(cast(bytes, data))

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

    def iter_rows(
        self, hook: str | None, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive batches of rows [start, stop) as bf16 [<=batch_size, d]."""
        key = f"{ACTS}/{self.resolve_hook(hook)}"
        stop = self.n_rows if stop is None else stop
        last = math.ceil(stop / self.layout.shard_rows)
        pre = self._prefetcher(key)
        try:
            for s in range(start, stop, batch_size):
                if pre is not None:  # a remote store: download the next shards while this one is read
                    i = s // self.layout.shard_rows
                    pre.want(range(i + 1, min(i + 1 + AHEAD_SHARDS, last)))
                yield bits_to_bf16(self._read(key, s, min(s + batch_size, stop)))
        finally:
            if pre is not None:
                pre.close()

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
        with_rows: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Seeded shuffled minibatches bf16 [batch_size, d] of rows below `stop_row`.

        Blocks of chunk_rows rows are permuted by (seed, epoch); rank r of w takes every w-th block
        of that permutation, so across ranks each row appears exactly once per epoch. The rank's
        blocks are taken `window_blocks` at a time, the window's rows are permuted, and consecutive
        batches are cut from the resulting stream (leftovers carry into the next window). Within
        a batch, rows come in window order (one gather per block, straight from the mapped file;
        the batch's membership is what is random). The next window is paged in by a background
        thread. `start_batch` skips that many batches without reading them (resume). The last
        batch may be short unless `drop_last`. `with_rows` yields (batch, int64 [batch_size] store
        row of each of its rows) instead, the same batches. See `saekit.store.shuffle`.
        """
        key = f"{ACTS}/{self.resolve_hook(hook)}"
        check_positive("batch_size", batch_size)
        plan = shuffle_plan(
            self.n_rows if stop_row is None else min(stop_row, self.n_rows),
            self.layout.chunk_rows,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            window_blocks=window_blocks,
        )
        first, skip = skip_windows(plan, start_batch * batch_size)
        # a plain function returning a generator: bad arguments fail here, not at the first next().
        d = self.layout.hooks[key[len(ACTS) + 1 :]]
        read = functools.partial(self._read, key)
        pre = self._prefetcher(key) if prefetch else None
        if pre is None:
            return batch_stream(read, d, batch_size, plan, first, skip, drop_last, prefetch, with_rows)
        s = self.layout.shard_rows
        ahead = lambda windows: pre.want(dict.fromkeys(a // s for w in windows for a, _ in w.blocks))  # noqa: E731
        return _closing(
            batch_stream(read, d, batch_size, plan, first, skip, drop_last, prefetch, with_rows, ahead), pre
        )

    def _prefetcher(self, key: str) -> Prefetcher | None:
        """Background downloads of the shards of `key` of a store in object storage (else None)."""
        if not self._in_bucket or not self._plain[key]:
            return None
        return Prefetcher(lambda i: self._view(key, cast(int, i)), DOWNLOAD_THREADS)

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
        if self._root is not None or self._in_bucket:
            for key in self._array_keys():
                problem = array_meta_problem(
                    self.layout, key, self._array_doc(key), self.n_rows if self.complete else None
                )
                if problem is not None:
                    bad.append(f"{key}/zarr.json: {problem}")
        expected = self.n_shards if self.complete else max(self._shards, default=-1) + 1
        recs = []
        for i in tqdm(range(expected), desc="verify", unit="shard", disable=not progress):
            problems, rec = self._verify_shard(i)
            bad += problems
            recs.append(rec)
        if self.has_truth and (problem := _features_problem(self._where.read_bytes(TRUTH_FEATURES), self.meta)):
            bad.append(f"{TRUTH_FEATURES}: {problem}")
        if recs and not bad:
            got = combined_stats(self.layout, recs, self.n_rows)
            for h in self.hooks:
                if json.dumps(got[h], sort_keys=True) != json.dumps(self._stats[h], sort_keys=True):  # exact, NaN too
                    bad.append(f"stats.{h}: mean / mean_sq_norm do not match the rows (recomputed from them)")
        return bad

    def _verify_shard(self, i: int) -> tuple[list[str], ShardRecord | None]:
        """(problems, the shard's record rebuilt from its rows) for shard i."""
        rec = self._shards.get(i)
        problems, stats = [], {}
        for key in self._array_keys():
            row, _ = array_spec(self.layout, key)
            name = shard_key(key, 1 + len(row), i)
            if rec is None:
                problems.append(f"{name}: no checksum recorded (shard missing)")
                continue
            try:
                v = self._load(key, i, check=False, fresh=True)  # a bucket's objects, not the cache's copies
            except _BadShard as e:
                problems.append(f"{e.name}: {e.what}")
                continue
            if crc32c_of(v) != rec["crc32c"][key]:
                problems.append(f"{name}: corrupt (checksum mismatch)")
            elif key.startswith(ACTS + "/"):
                stats[key[len(ACTS) + 1 :]] = row_stats(v)  # what the writer computed
        if rec is None:
            return problems, None
        return problems, ShardRecord(i, rec["start"], rec["stop"], rec["crc32c"], record_sums(stats))


def _features_problem(data: bytes | None, meta: dict) -> str | None:
    """What is wrong with a synthetic store's true-features file, or None."""
    if data is None:
        return "missing"
    want = (meta.get("synthetic") or {}).get("features_sha256") if isinstance(meta.get("synthetic"), dict) else None
    if not isinstance(want, str):
        return "not described by the store's meta (no features_sha256)"
    if hashlib.sha256(data).hexdigest() != want:
        return "damaged (their sha256 is not the one the store recorded)"
    return None


def _closing(stream: Iterator, pre: Prefetcher) -> Iterator:
    """`stream`, then the prefetcher's pending downloads cancelled (also when the reader stops early)."""
    try:
        yield from stream
    finally:
        pre.close()

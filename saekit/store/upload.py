"""Where a store being written is published: in place (a local directory) or into object storage
(a local staging folder, mirrored shard by shard). `publisher(path, ...)` picks one; the writer
calls the same methods on either (`InPlace` does nothing where `RemoteMirror` uploads), so it never
branches on the kind of place.

`create_store(url, ...)` builds the store in a local staging folder exactly as it would on a local
disk (whole shard files, completion records, zarr.json) and a `RemoteMirror` publishes each piece
as soon as it is final:

    shard i:   its array files are uploaded (each checked for its size once it is there), then its
               completion record; the local shard files are then deleted, so staging holds about
               one shard per writer
    finalize:  the arrays' zarr.json, then the group's zarr.json with complete=true, last

so a reader of the bucket never sees a shard without its data, nor a complete store with a shard
missing. `--resume` rebuilds the staging folder from the bucket (metadata and records; no shard
data); the writer then proves each recorded shard against its record (sizes here, then its rows'
crc32c and statistics, `saekit.store.writer._shard_problem`); ranks under torchrun each stage in
their own folder and write disjoint shards, as they do locally.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np

from saekit.atomic import Busy, Lock
from saekit.errors import SaekitError, is_non_empty
from saekit.store.format import StoreLayout, array_spec, is_metadata_name, metadata_files, shard_files
from saekit.store.remote import Remote, is_remote, local_file, url_key
from saekit.store.shards import (
    RECORDS_DIR,
    ShardRecord,
    clear_group,
    discard_unfinished_creation,
    is_record_name,
    record_path,
    remove_entries,
)


def default_staging() -> Path:
    """Where remote writers stage: $SAEKIT_STAGING, else ~/.cache/saekit/staging."""
    return Path(os.environ.get("SAEKIT_STAGING") or Path.home() / ".cache" / "saekit" / "staging")


def shard_file_size(layout: StoreLayout, key: str) -> int:
    """Bytes of one shard file of array `key` as saekit writes it (data, then the shard index)."""
    row, dtype = array_spec(layout, key)
    data = layout.shard_rows * int(np.prod(row, dtype=np.int64)) * dtype.itemsize
    return data + (layout.shard_rows // layout.chunk_rows) * 16 + 4


def publisher(
    path: str | os.PathLike, rank: int, staging: str | os.PathLike | None, entries: Collection[str], fmt: str
) -> InPlace | RemoteMirror:
    """How a store written at `path` is published: a URL through a locked staging folder
    (`RemoteMirror`), a local directory in place, locked for its writer (`InPlace`). `entries`
    and `fmt`: the store's top-level names and format (what a killed creation may leave)."""
    if is_remote(path):
        return RemoteMirror.staged(str(path), rank, staging)
    return InPlace.locked(Path(path), rank, entries, fmt)


class InPlace:
    """A store written where it lives, a local directory: nothing to publish, so each method of
    `RemoteMirror` that uploads or downloads does nothing here. The directory is locked by rank 0
    of the job writing it, for as long as its writer lives."""

    def __init__(self, root: Path, lock: Lock | None, entries: Collection[str], fmt: str):
        self.root, self._lock, self._entries, self._fmt = root, lock, entries, fmt
        self.objects_at_open: dict[str, int] = {}  # a bucket's listing; a directory has none to keep
        self.where: str | Path = root  # the store, as the user named it

    @classmethod
    def locked(cls, root: Path, rank: int, entries: Collection[str], fmt: str) -> InPlace:
        """The directory `root` (made if need be), locked for rank 0 (another harvest of the same
        store is one line, never a second writer of the same shards); ranks > 0 join a store
        their rank 0 holds."""
        if root.exists() and not root.is_dir():
            raise SaekitError(f"{root} is a file, not a directory; choose a directory path for the store")
        root.mkdir(parents=True, exist_ok=True)
        if rank > 0:
            return cls(root, None, entries, fmt)
        try:
            return cls(root, Lock(root), entries, fmt)
        except Busy:
            raise SaekitError(
                f"another process is writing the store {root} right now (a harvest of the same data?); "
                "wait for it to finish, then rerun: its store will be reused, or resumed if it was stopped"
            ) from None

    def open_existing(self, rank: int, layout: StoreLayout) -> bool:
        """Whether a store (or anything) is here; what a creation killed before its attributes
        were written left behind is removed first (rank 0)."""
        if rank == 0:
            discard_unfinished_creation(self.root, self._fmt, self._entries)
        return is_non_empty(self.root)

    def pull_all(self) -> None:
        """Everything a writer reads is here already."""

    def clear_all(self) -> None:
        clear_group(self.root, "replacing a store (--overwrite)")

    def shard_problem(self, layout: StoreLayout, rec: ShardRecord, objects: dict[str, int]) -> str | None:
        return None  # the files are here: the writer proves the rows themselves

    def fetch(self, name: str) -> None:
        """A shard file is read where it is."""

    def free(self, names: Collection[str]) -> None:
        """Shard files stay: they are the store."""

    def pull_records(self) -> None:
        """Every rank's records are in the directory already."""

    def push_metadata(self, layout: StoreLayout) -> None:
        """The metadata is written where it lives."""

    def push_shard(self, layout: StoreLayout, index: int) -> None:
        """The shard and its record are written where they live."""

    def push_record(self, index: int) -> None:
        """The record is written where it lives."""

    def drop_record(self, index: int) -> None:
        """The writer has removed the record from the directory itself."""

    def refuse_truncation(self, stop: int, total: int) -> None:
        """A local store can be cut inside a shard: its last shard is rewritten."""

    def finished(self, layout: StoreLayout) -> None:
        """The complete store's records live in its attributes now: the records folder (not part
        of the zarr hierarchy) goes, and the lock with it."""
        shutil.rmtree(self.root / RECORDS_DIR, ignore_errors=True)
        self.done()

    def done(self) -> None:
        if self._lock is not None:
            self._lock.release()


class RemoteMirror:
    """Publishes a store being written in the local folder `root` to `remote`, piece by piece."""

    def __init__(self, remote: Remote, root: Path, lock: Lock | None = None):
        self.remote, self.root, self._lock = remote, root, lock
        self.where: str | Path = remote.url  # the store, as the user named it
        self.objects_at_open: dict[str, int] = {}  # the bucket's objects (name -> size) when a writer opened it

    @classmethod
    def staged(cls, url: str, rank: int, staging: str | os.PathLike | None) -> RemoteMirror:
        """A mirror of `url` with a fresh staging folder for writer `rank`, locked for this writer
        (a second harvest to the same URL from this machine is one line, not a staging folder
        deleted under the first one)."""
        remote = Remote(url)
        root = Path(staging) if staging else default_staging()
        root = root / f"{url_key(remote.url)}-rank{rank}"
        root.mkdir(parents=True, exist_ok=True)  # kept (empty) after use: the lock lives on it
        try:
            lock = Lock(root)
        except Busy:
            raise SaekitError(
                f"another process on this machine is writing {remote.url} right now (its staging folder {root} is in use); "
                "wait for it to finish, then rerun: its store will be reused, or resumed if it was stopped"
            ) from None
        _empty(root)  # staging is rebuilt from the bucket, never trusted
        return cls(remote, root, lock)

    # -- what is in the bucket ---------------------------------------------------------------------

    def objects(self) -> dict[str, int]:
        return self.remote.list()

    def open_existing(self, rank: int, layout: StoreLayout) -> bool:
        """Whether the bucket holds a store (or anything) under the URL, its metadata and records
        pulled into staging; a creation killed before its group zarr.json (metadata only, no rows)
        is removed first (rank 0)."""
        self.remote.check_writable()
        objects = self.objects()
        if rank == 0 and "zarr.json" not in objects and set(objects) <= set(metadata_files(layout)):
            self.clear(objects)
            objects = {}
        self.pull(objects)
        self.objects_at_open = objects
        return bool(objects)

    def pull_all(self) -> None:
        """The bucket's metadata and records, into staging (extending a complete store)."""
        self.objects_at_open = self.objects()
        self.pull(self.objects_at_open)

    def clear_all(self) -> None:
        """--overwrite: every object under the URL, then staging (which keeps its lock)."""
        self.clear(self.objects_at_open)
        remove_entries(self.root, [p.name for p in self.root.iterdir()])

    def fetch(self, name: str) -> None:
        """Shard file `name` into staging, unless it is there."""
        if not (self.root / name).is_file():
            self.remote.get_file(name, self.root / name)

    def free(self, names: Collection[str]) -> None:
        """Staging copies of shard files, once read."""
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    def pull(self, objects: dict[str, int]) -> None:
        """Copy the store's metadata and completion records (no shard data) into staging: only
        objects whose names the store format defines (a listing is untrusted input), each to its
        place inside staging."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in objects:
            if is_metadata_name(name) or is_record_name(name):
                self.remote.get_file(name, local_file(self.root, name))

    def pull_records(self) -> None:
        """Every rank's completion records, for rank 0's finalize."""
        self.pull({n: 0 for n in self.remote.list(RECORDS_DIR)})

    def clear(self, objects: dict[str, int]) -> None:
        """Remove every object under the URL (--overwrite of a store there)."""
        self.remote.remove(list(objects))

    def shard_problem(self, layout: StoreLayout, rec: ShardRecord, objects: dict[str, int]) -> str | None:
        """What is wrong with a recorded shard in the bucket (an object missing or of the wrong
        size), or None: the check that needs no download, made first (`saekit.store.writer._shard_problem`
        then proves the rows)."""
        for key, name in shard_files(layout, rec.index).items():
            size = objects.get(name)
            if size is None:
                return f"{name}: missing"
            if size != shard_file_size(layout, key):
                return f"{name}: {size} bytes, not {shard_file_size(layout, key)}"
        return None

    # -- publishing ---------------------------------------------------------------------------------

    def push_metadata(self, layout: StoreLayout) -> None:
        """The arrays' zarr.json, then the group's (the store's state lives there): last."""
        for name in metadata_files(layout):
            self.remote.put_file(self.root / name, name)

    def push_shard(self, layout: StoreLayout, index: int) -> None:
        """Upload shard `index` (its record is in staging): files first, each checked, then the
        record; then free the staging copy of the data."""
        files = shard_files(layout, index).values()
        for name in files:
            self.remote.put_file(self.root / name, name)
        self.push_record(index)
        for name in files:
            (self.root / name).unlink(missing_ok=True)

    def push_record(self, index: int) -> None:
        rec = record_path(self.root / RECORDS_DIR, index)
        self.remote.put_file(rec, f"{RECORDS_DIR}/{rec.name}")

    def drop_record(self, index: int) -> None:
        """Forget a bad shard's record in the bucket, so no reader or resume takes it as done."""
        self.remote.remove([f"{RECORDS_DIR}/{record_path(Path(), index).name}"])

    def refuse_truncation(self, stop: int, total: int) -> None:
        if stop > total:
            raise SaekitError(
                f"finalize(n_rows={total}) would cut a shard of {self.remote.url} already uploaded; "
                f"write the store locally to truncate it, or finalize without n_rows ({stop} rows)"
            )

    def finished(self, layout: StoreLayout) -> None:
        """The group's zarr.json, complete, is the last object written; staging is emptied."""
        self.push_metadata(layout)
        self.done()

    def done(self) -> None:
        _empty(self.root)
        if self._lock is not None:
            self._lock.release()


def _empty(root: Path) -> None:
    """Remove everything inside `root`, not `root` itself."""
    for p in root.iterdir() if root.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

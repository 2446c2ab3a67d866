"""Writing an activation store into object storage: a local staging folder, mirrored shard by shard.

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
crc32c and statistics, `store_writer._shard_problem`); ranks under torchrun each stage in
their own folder and write disjoint shards, as they do locally.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from saekit.atomic import Busy, Lock
from saekit.errors import SaekitError
from saekit.remote import Remote, local_file, url_key
from saekit.shards import RECORDS_DIR, ShardRecord, is_record_name, record_path
from saekit.store_format import StoreLayout, array_spec, is_metadata_name, metadata_files, shard_files


def default_staging() -> Path:
    """Where remote writers stage: $SAEKIT_STAGING, else ~/.cache/saekit/staging."""
    return Path(os.environ.get("SAEKIT_STAGING") or Path.home() / ".cache" / "saekit" / "staging")


def shard_file_size(layout: StoreLayout, key: str) -> int:
    """Bytes of one shard file of array `key` as saekit writes it (data, then the shard index)."""
    row, dtype = array_spec(layout, key)
    data = layout.shard_rows * int(np.prod(row, dtype=np.int64)) * dtype.itemsize
    return data + (layout.shard_rows // layout.chunk_rows) * 16 + 4


class RemoteMirror:
    """Publishes a store being written in the local folder `root` to `remote`, piece by piece."""

    def __init__(self, remote: Remote, root: Path, lock: Lock | None = None):
        self.remote, self.root, self._lock = remote, root, lock
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
        size), or None: the check that needs no download, made first (`store_writer._shard_problem`
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


def refuse_truncation(remote: Remote, stop: int, total: int) -> None:
    if stop > total:
        raise SaekitError(
            f"finalize(n_rows={total}) would cut a shard of {remote.url} already uploaded; "
            f"write the store locally to truncate it, or finalize without n_rows ({stop} rows)"
        )

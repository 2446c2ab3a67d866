"""`saekit copy SRC DST`: copy a complete activation store between local disk and object storage.

SRC and DST are each a local directory or an fsspec URL (s3://, gs://, ...; see `saekit.store.remote`).
Whole files move, many shard files at once, and every shard file is checked against the crc32c
the store records for its valid rows: a local source before it is sent (a damaged store is never
published), a download after it lands (fetched again up to twice, then an error). The order is
the writer's: shard files, their completion records if any, then the zarr.json files with the
group's last, so DST becomes a store (and a complete one) only at the copy's last write, and a
killed copy never looks like a store.

A marker at DST (`.saekit-copying`, the source's content hash) says whose copy is under way, so a
rerun resumes it (keeping the shard files already there and good), while files of anything else
are never mistaken for this store's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from saekit.config import check_positive, need
from saekit.errors import SaekitError
from saekit.store.format import (
    StoreLayout,
    array_spec,
    attrs_of,
    check_attrs,
    content_hash,
    metadata_files,
    shard_files,
)
from saekit.store.location import Location, location
from saekit.store.remote import each_parallel
from saekit.store.shards import RECORDS_DIR, ShardLayoutError, crc32c_of, map_shard_file, record_path

MARKER = ".saekit-copying"  # at DST from a copy's first write to its last: the source's content hash
TRIES = 3  # downloads of a shard file before a checksum mismatch is an error


@dataclass
class CopyConfig:
    """Copy a complete store to or from object storage (or between two places of either kind)."""

    src: str = field(default="", metadata={"argument": "SRC"})
    """The store to copy: a directory, or a URL such as s3://bucket/cache/store."""
    dst: str = field(default="", metadata={"argument": "DST"})
    """Where to copy it: a directory or a URL. Rerunning a killed copy continues where it stopped."""
    threads: int = 8
    """Shard files moved at once."""
    overwrite: bool = False
    """Replace another saekit store (or another store's unfinished copy) at DST."""
    progress: bool | None = None
    """Show a progress bar; default: when stderr is a terminal."""

    def __post_init__(self) -> None:
        need(bool(self.src), "SRC is required: the store to copy (a directory or a URL)")
        need(bool(self.dst), "DST is required: where to copy the store (a directory or a URL)")
        check_positive("--threads", self.threads)


class CopyResult(NamedTuple):
    """What `copy_store` did."""

    dst: str
    content_hash: str
    copied: int  # shard files moved now
    kept: int  # shard files an earlier, interrupted copy left at DST, checked and kept
    bytes: int  # bytes of the shard files moved now
    seconds: float
    already: bool  # DST already held this store: nothing was copied

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


class ShardFile(NamedTuple):
    """One shard file of one array, with what its check needs."""

    name: str  # path inside the store, '/'-separated
    key: str  # its array
    n_valid: int  # rows its checksum covers
    crc32c: int  # the recorded checksum of those rows
    size: int  # bytes at SRC


# ---------------------------------------------------------------------------------------------
# the copy


def copy_store(cfg: CopyConfig) -> CopyResult:
    """Copy the complete store at cfg.src to cfg.dst (see the module docstring for the guarantees)."""
    start = time.perf_counter()
    src, dst = location(cfg.src), location(cfg.dst)
    _refuse_overlap(src, dst)
    attrs, layout, group = _source(src)
    listing = src.list()
    files = _shard_plan(src, listing, layout, attrs)
    # the records of the store's own shards, by the names the format gives them (a listing is untrusted)
    records = [n for r in attrs["shards"] if (n := f"{RECORDS_DIR}/{record_path(Path(), r['index']).name}") in listing]
    progress = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    job = _Copy(src, dst, layout, attrs["content_hash"], cfg.threads, progress)
    kept = "the shard files copied so far are kept, and DST becomes a store only when the copy finishes"
    with dst.writing("DST", kept, "rerun the same `saekit copy` to continue"):
        return job.run(files, records, group, cfg.overwrite, start)


def _refuse_overlap(src: Location, dst: Location) -> None:
    if src.contains(dst) or dst.contains(src):  # as places, not strings: s3:// and s3a:// are one bucket
        raise SaekitError(f"SRC {src} and DST {dst} are the same place or one is inside the other; copy to another DST")


def _source(src: Location) -> tuple[dict, StoreLayout, bytes]:
    """The attributes, layout and zarr.json bytes of the complete store at SRC."""
    data = src.read_bytes("zarr.json")
    attrs = attrs_of(data, src.url) if data is not None else None
    if data is None and not src.exists():
        raise SaekitError(f"SRC {src} does not exist; {src.hint}")
    if data is None or attrs is None:
        raise SaekitError(f"SRC {src} is not a saekit activation store (no store's zarr.json there); {src.hint}")
    layout = check_attrs(src, attrs)
    if not attrs["complete"]:
        raise SaekitError(
            f"SRC {src} is an incomplete store (its harvest did not finish); finish the harvest first "
            "(saekit harvest --resume), then copy it"
        )
    if content_hash(attrs) != attrs["content_hash"]:
        raise SaekitError(
            f"SRC {src}: its attributes do not match its content hash (zarr.json was edited or damaged); "
            "restore zarr.json from a copy or re-harvest"
        )
    return attrs, layout, data


def _shard_plan(src: Location, listing: dict[str, int], layout: StoreLayout, attrs: dict) -> list[ShardFile]:
    """Every shard file of the store, in shard order; a missing one is an error before anything is copied."""
    files = []
    for r in attrs["shards"]:
        for key, name in shard_files(layout, r["index"]).items():
            if not listing.get(name):
                raise SaekitError(
                    f"SRC {src}: shard file {name} is missing, so the store cannot be copied; "
                    f"run `saekit verify {src}` to list every problem, then restore it or re-harvest"
                )
            files.append(ShardFile(name, key, r["stop"] - r["start"], r["crc32c"][key], listing[name]))
    return files


def shard_file_problem(path: Path, layout: StoreLayout, f: ShardFile) -> str | None:
    """What is wrong with a local copy of shard file `f` (its index, and the crc32c of its valid
    rows as recorded), or None."""
    row, dtype = array_spec(layout, f.key)
    try:
        rows = map_shard_file(path, (layout.shard_rows, *row), layout.chunk_rows, dtype, f.n_valid)
    except FileNotFoundError:
        return "missing"
    except (OSError, ShardLayoutError) as e:
        return f"unreadable ({type(e).__name__})"
    ok = crc32c_of(rows) == f.crc32c
    del rows  # unmap before the file is renamed or removed
    return None if ok else "corrupt (checksum mismatch)"


class _Copy:
    """One copy from `src` to `dst`: the shard files in parallel, then the records and the metadata."""

    def __init__(self, src: Location, dst: Location, layout: StoreLayout, digest: str, threads: int, progress: bool):
        self.src, self.dst, self.layout, self.digest = src, dst, layout, digest
        self.threads, self.progress = threads, progress
        self.have: dict[str, int] = {}  # what DST holds of an earlier, interrupted copy
        self.staging: Path | None = None  # remote to remote: downloads land here first

    def run(
        self, files: list[ShardFile], records: list[str], group: bytes, overwrite: bool, start: float
    ) -> CopyResult:
        have = _prepare(self.dst, group, self.digest, overwrite, files)
        if have is None:
            return CopyResult(self.dst.url, self.digest, 0, 0, 0, time.perf_counter() - start, already=True)
        self.have = have
        self.dst.write_bytes(MARKER, json.dumps({"source": self.src.url, "content_hash": self.digest}).encode())
        with tempfile.TemporaryDirectory(prefix="saekit-copy-") as staging:
            self.staging = Path(staging)
            moved = self._shard_files(files)
        self.dst.remove([n for n in self.have if n.rsplit("/", 1)[-1].endswith(".partial")])  # a killed copy's
        each_parallel(lambda n: self.dst.write_bytes(n, self._read(n)), records, self.threads)
        for name in metadata_files(self.layout)[:-1]:
            self.dst.write_bytes(name, self._read(name))
        self.dst.write_bytes("zarr.json", group)  # last: from here on DST is a complete store
        self.dst.remove([MARKER])
        copied = sum(1 for n in moved if n)
        return CopyResult(
            self.dst.url, self.digest, copied, len(files) - copied, sum(moved), time.perf_counter() - start, False
        )

    def _shard_files(self, files: list[ShardFile]) -> list[int]:
        lock = threading.Lock()
        with tqdm(total=len(files), desc="copy", unit="file", file=sys.stderr, disable=not self.progress) as bar:

            def one(f: ShardFile) -> int:
                moved = self._shard(f)
                with lock:
                    bar.update(1)
                return moved

            return each_parallel(one, files, self.threads)

    def _read(self, name: str) -> bytes:
        data = self.src.read_bytes(name)
        if data is None:
            raise SaekitError(f"SRC {self.src}: {name} is missing; restore it from a copy or re-harvest")
        return data

    def _shard(self, f: ShardFile) -> int:
        """Copy one shard file, checked, unless DST has it already; returns the bytes moved."""
        if self._kept(f):
            return 0
        here = self.src.in_place(f.name)
        if here is None:
            here = self._download(f)
        elif (problem := shard_file_problem(here, self.layout, f)) is not None:
            raise SaekitError(
                f"SRC {self.src}: shard file {f.name} is {problem}, so it is not copied (a damaged store is never "
                f"published); run `saekit verify {self.src}`, then restore it or re-harvest"
            )
        self.dst.put_file(here, f.name)  # whole; an object's size is checked after its upload
        if self.staging is not None and self.staging in here.parents:
            here.unlink()
        return f.size

    def _kept(self, f: ShardFile) -> bool:
        """DST holds this file from an earlier copy: locally checked as a download is, remotely by size."""
        if f.name not in self.have:
            return False
        there = self.dst.in_place(f.name)
        if there is not None:
            return shard_file_problem(there, self.layout, f) is None
        return self.have[f.name] == f.size

    def _landing(self, f: ShardFile) -> Path:
        """Where a download lands before its check: beside its final name at a local DST."""
        final = self.dst.in_place(f.name)
        if final is not None:
            return final.with_name(f".{final.name}.{os.getpid()}.partial")
        if self.staging is None:
            raise SaekitError("internal: a download before the copy's staging folder exists; report this")
        return self.staging / f.name.replace("/", "_")

    def _download(self, f: ShardFile) -> Path:
        """Fetch a shard file and check it; a mismatch is fetched again, up to TRIES times in all."""
        local = self._landing(f)
        for _ in range(TRIES):
            self.src.get_file(f.name, local)
            problem = shard_file_problem(local, self.layout, f)
            if problem is None:
                return local
        local.unlink(missing_ok=True)
        raise SaekitError(
            f"{self.src.url}/{f.name} is {problem} in {TRIES} downloads, so it is not copied: the object is damaged; "
            f"run `saekit verify {self.src.url}`, restore it, then rerun the copy"
        )


def _prepare(
    dst: Location, group: bytes, digest: str, overwrite: bool, files: list[ShardFile]
) -> dict[str, int] | None:
    """What DST holds that this copy may keep (name -> size), after clearing it for --overwrite;
    None when DST already holds this very store. Anything else there is refused."""
    data, marker = dst.read_bytes("zarr.json"), dst.read_bytes(MARKER)
    if data is not None:
        if data == group:
            there = dst.list()
            if all(there.get(f.name) == f.size for f in files):
                if marker is not None:  # a copy killed just after its last write
                    dst.remove([MARKER])
                return None
            # this store's zarr.json over missing shard files (an --overwrite cut short): not a
            # store until the copy is finished again
            dst.remove(["zarr.json"])
            return there
        attrs = attrs_of(data, dst.url)  # a damaged zarr.json is one line, and DST is left alone
        if attrs is None:
            raise SaekitError(
                f"DST {dst} holds a zarr.json that is not a saekit store's; refusing to touch it: choose another DST"
            )
        what = f"another saekit store ({attrs.get('content_hash') or 'incomplete'})"
    elif marker is not None:
        if _marker_hash(marker) == digest:
            return dst.list()  # this store's copy, interrupted: resume it
        what = "an unfinished copy of another store"
    elif dst.is_non_empty():
        raise SaekitError(
            f"DST {dst} is not empty and holds no saekit store; refusing to write into it or delete it: "
            "choose an empty DST"
        )
    else:
        return {}
    if not overwrite:
        raise SaekitError(f"DST {dst} holds {what}; pass --overwrite to replace it, or choose another DST")
    dst.remove(["zarr.json"])  # first: a removal cut short leaves no store that looks complete
    dst.clear()
    return {}


def _marker_hash(marker: bytes) -> str | None:
    try:
        doc = json.loads(marker)
    except ValueError:  # cut short: whose copy it was is unknown
        return None
    return doc.get("content_hash") if isinstance(doc, dict) else None

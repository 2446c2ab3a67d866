"""The local shard cache: remote stores' shard files, downloaded whole, checked and memory-mapped.

A reader of a store in object storage (`saekit.store.remote`) fetches each shard file it touches into

    <cache dir>/<store key>/<shard file path>      e.g. ~/.cache/saekit/shards/3a10d7f89b31c2e0/acts/h/c/4/0

and memory-maps it like a local store's. <store key> is the start of a complete store's content
hash (its content decides its files, so two stores never share a name and two copies of one store
share their files) or `url-<key of its URL>` for a store still being written.

- **Checked.** A download goes to a temp file and is renamed into place (`Remote.get_file`); the
  reader's `open_checked` then maps it and compares its crc32c with the store's record. A short,
  unreadable or mismatching download is deleted and fetched again, `TRIES` times in all, then it is
  "corrupt in the bucket". A cached file is checked the same way the first time a process maps it,
  so a file damaged on the local disk is fetched again, never used.
- **Bounded.** Before a download would take the cache over its bound, the least recently used
  files go (a file's mtime is its last use; every use touches it). The files a process is
  downloading are reserved and never evicted under it. A file another process still maps may be
  evicted: its mapping stays valid (Linux frees the space when it is unmapped).
- **Shared.** Threads of one process share a lock per file and one reservation ledger per cache
  directory; processes share the directory through atomic renames only.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saekit.config import check_positive, need
from saekit.errors import SaekitError, local_path, os_error_message
from saekit.store.remote import local_file

ENV_DIR, ENV_GB = "SAEKIT_SHARD_CACHE", "SAEKIT_SHARD_CACHE_GB"
DEFAULT_GB = 32.0
TRIES = 3  # downloads of one shard file before it is called corrupt in the bucket
MARKER = ".saekit-shard-cache"  # marks a directory as a shard cache: eviction deletes files only in one
STALE_PARTIAL_S = 3600  # a download temp file untouched this long was left by a killed process
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.ENAMETOOLONG}
_STORE_DIR = re.compile(r"^([0-9a-f]{16}|url-[0-9a-f]{16})$")  # what eviction may delete under


@dataclass(kw_only=True)
class ShardCacheFields:
    """The settings of the shard cache, shared by every command that reads a store (one flag each)."""

    cache_dir: str = ""
    """Local directory caching the shard files of a store in object storage (s3://, gs://, ...); default $SAEKIT_SHARD_CACHE or ~/.cache/saekit/shards."""
    cache_gb: float | None = None
    """Size bound of that shard cache in GiB (least recently used shards are deleted first); default $SAEKIT_SHARD_CACHE_GB or 32."""

    def __post_init__(self) -> None:
        if self.cache_gb is not None:
            check_cache_gb("--cache-gb", self.cache_gb)
        local_path(self.cache_dir, "--cache-dir", "the shard cache is a local directory: pass a local path")


class ShardFetchError(Exception):
    """A shard file that cannot be had: `what` says why (for the reader's one-line error)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class BadFile(Exception):
    """Raised by `open_checked` for a file that fails its check (`str(e)` says how)."""


def shard_cache(cache_dir: str | os.PathLike = "", cache_gb: float | None = None) -> ShardCache:
    """The shard cache at `cache_dir` (default $SAEKIT_SHARD_CACHE or ~/.cache/saekit/shards) bounded
    to `cache_gb` GiB (default $SAEKIT_SHARD_CACHE_GB or 32), created if needed."""
    where = cache_dir or os.environ.get(ENV_DIR) or Path.home() / ".cache" / "saekit" / "shards"
    where = local_path(where, "--cache-dir", "the shard cache is a local directory: pass a local path").expanduser()
    gb = cache_gb if cache_gb is not None else _env_gb()
    check_cache_gb("--cache-gb", gb)
    _make_cache_dir(where)
    return ShardCache(where.resolve(), int(gb * 2**30))


def _env_gb() -> float:
    text = os.environ.get(ENV_GB, "")
    if not text:
        return DEFAULT_GB
    try:
        gb = float(text)
    except ValueError:
        raise SaekitError(f"{ENV_GB}={text!r} is not a number of GiB; set it to e.g. 32, or pass --cache-gb") from None
    need(
        math.isfinite(gb) and gb > 0,
        f"{ENV_GB}={text!r} must be a positive number; set it to e.g. 32, or pass --cache-gb",
    )
    check_cache_gb(ENV_GB, gb)
    return gb


MAX_GB = 2.0**20  # 1 PiB: more than any cache disk, and far from a float's range


def check_cache_gb(flag: str, gb: float) -> None:
    """A positive, finite size bound no larger than `MAX_GB`."""
    check_positive(flag, gb)
    need(gb <= MAX_GB, f"{flag} {gb:g} is more than any disk holds: pass at most {MAX_GB:.0f} (1 PiB)")


def _make_cache_dir(where: Path) -> None:
    """Create the cache directory (or accept an empty one or an existing cache); never adopt a
    directory holding other files, since eviction deletes files in it."""
    what = f"shard cache --cache-dir {where}"
    try:
        if where.is_dir() and not (where / MARKER).is_file() and any(where.iterdir()):
            raise SaekitError(
                f"{what} holds other files and is not a saekit shard cache; pass an empty or new directory"
            )
        where.mkdir(parents=True, exist_ok=True)
        (where / MARKER).touch()
    except OSError as e:
        raise SaekitError(os_error_message(e, what)) from None


class _Ledger:
    """What the threads of this process share about one cache directory."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reserved = 0  # bytes of the downloads in flight
        self.busy: set[Path] = set()  # files being downloaded or checked: never evicted
        # checked mappings of cached files: what they were checked against, the file (device,
        # inode) mapped, the mapping. A file another process evicted or replaced is not reused,
        # and its mapping is dropped, so its disk space is freed.
        self.maps: dict[Path, tuple[Hashable, tuple[int, int] | None, np.ndarray]] = {}
        self.locks: dict[Path, threading.Lock] = {}

    def lock(self, file: Path) -> threading.Lock:
        with self.cond:
            return self.locks.setdefault(file, threading.Lock())


_LEDGERS: dict[Path, _Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


class ShardCache:
    """A shard cache directory with a size bound; `get` returns a checked, memory-mapped shard file."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = directory, max_bytes
        with _LEDGERS_LOCK:
            self._ledger = _LEDGERS.setdefault(directory, _Ledger())

    def get(
        self,
        remote: Any,
        name: str,
        store_key: str,
        open_checked: Callable[[Path], np.ndarray],
        check: Hashable,
        fresh: bool = False,
    ) -> np.ndarray:
        """The object `name` of `remote` (a `saekit.store.remote.Remote`) as `open_checked` maps it:
        from the cache when a good copy is there, else downloaded. `check` names what
        `open_checked` checks (e.g. rows and crc32c): a mapping checked against something else is
        not reused (a store being written may redo a shard). `fresh`: download it again whatever
        the cache holds (`verify` checks the bucket, not the cache). Raises ShardFetchError when
        the object is missing or fails its check in every download."""
        file = local_file(self.dir, f"{store_key}/{name}")  # a symlink planted on the way is refused
        led = self._ledger
        if not fresh and (v := self._mapped(file, check)) is not None:
            return v
        with led.lock(file):
            if not fresh and (v := self._mapped(file, check)) is not None:
                return v
            # never mapped here, checked against another record, or evicted by another process
            v = None if fresh else self._open_cached(file, open_checked)
            if v is None:
                v = self._download(remote, name, file, open_checked)
            led.maps[file] = (check, _file_id(file), v)
            return v

    def _mapped(self, file: Path, check: Hashable) -> np.ndarray | None:
        """This process's checked mapping of `file`, while it is still the file on disk."""
        hit = self._ledger.maps.get(file)
        if hit is None or hit[0] != check:
            return None
        if hit[1] is None or _file_id(file) != hit[1] or not _touch(file):
            self._ledger.maps.pop(file, None)  # evicted or replaced by another process: unmap it
            return None
        return hit[2]

    def _open_cached(self, file: Path, open_checked: Callable[[Path], np.ndarray]) -> np.ndarray | None:
        """The cached copy, checked; None when there is none, or it is bad (then it is deleted)."""
        try:
            v = open_checked(file)
        except FileNotFoundError:
            return None
        except (BadFile, OSError, ValueError):  # damaged on the local disk: fetched again, never used
            file.unlink(missing_ok=True)
            return None
        return v if _touch(file) else None

    def _download(self, remote: Any, name: str, file: Path, open_checked: Callable[[Path], np.ndarray]) -> np.ndarray:
        why = ""
        for _ in range(TRIES):
            size = remote.size(name)
            if not size:
                raise ShardFetchError("missing in the bucket" if size is None else "empty (0 bytes) in the bucket")
            if size > self.max_bytes:
                raise SaekitError(
                    f"{remote.url}/{name} is {_gib(size)} but the shard cache {self.dir} holds at most "
                    f"{_gib(self.max_bytes)}; raise --cache-gb (or {ENV_GB})"
                )
            with self._reserve(file, size):
                self._get_file(remote, name, file)
                try:
                    got = file.stat().st_size
                    if got != size:
                        raise BadFile(f"a download of {got} of its {size} bytes")
                    return open_checked(file)
                except FileNotFoundError:  # evicted by another process sharing the cache: not damage
                    continue
                except (BadFile, OSError, ValueError) as e:
                    file.unlink(missing_ok=True)
                    why = str(e) if isinstance(e, BadFile) else type(e).__name__
        if not why:
            raise SaekitError(
                f"{remote.url}/{name}: other processes sharing the shard cache {self.dir} evicted it before it "
                f"could be read, {TRIES} times; raise --cache-gb (or {ENV_GB})"
            )
        raise ShardFetchError(f"corrupt in the bucket ({why}, in each of {TRIES} downloads)")

    def _get_file(self, remote: Any, name: str, file: Path) -> None:
        """Download one object; a full or read-only local disk is named as the cache's problem."""
        try:
            remote.get_file(name, file)
            return
        except (OSError, SaekitError) as e:
            cause = e if isinstance(e, OSError) else e.__cause__
            if not (isinstance(cause, OSError) and cause.errno in _LOCAL_ERRNOS):
                raise
        # raised here, outside the handler, so no caller takes it for a full disk of its own output
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SaekitError(
                f"shard cache {self.dir}: {cause.strerror} while downloading {name}; free space there, "
                "or pass a smaller --cache-gb or another --cache-dir"
            )
        raise SaekitError(os_error_message(cause, f"shard cache {self.dir}"))

    # -- the size bound -------------------------------------------------------------------------

    @contextmanager
    def _reserve(self, file: Path, nbytes: int) -> Iterator[None]:
        """Room for `nbytes` more (least recently used files evicted first); `file` is busy inside."""
        led = self._ledger
        with led.cond:
            while not self._make_room(nbytes) and led.reserved:
                led.cond.wait()  # the room is held by downloads in flight: they end soon
            led.reserved += nbytes
            led.busy.add(file)
        try:
            yield
        finally:
            with led.cond:
                led.reserved -= nbytes
                led.busy.discard(file)
                led.cond.notify_all()

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used idle files until `nbytes` more fit; False if they cannot yet."""
        led = self._ledger
        files = sorted(self._files())  # (mtime, size, path), oldest first
        used = led.reserved + sum(s for _, s, _ in files)
        for _, size, path in files:
            if used + nbytes <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            led.maps.pop(path, None)
            used -= size
        for path, hit in list(led.maps.items()):  # files other processes evicted: unmap, free their space
            if path not in led.busy and _file_id(path) != hit[1]:
                led.maps.pop(path, None)
        return used + nbytes <= self.max_bytes

    def _files(self) -> list[tuple[float, int, Path]]:
        """Every cached file but the busy ones; removes download temp files left by killed processes.
        Only regular files in real folders count: a symlink (to a folder or a file) is never
        followed, so eviction never deletes anything outside the cache (a shared directory may
        hold links someone else planted)."""
        out = []
        now = time.time()
        for sub in self.dir.iterdir():
            if not _STORE_DIR.match(sub.name) or sub.is_symlink() or not sub.is_dir():
                continue
            for here, _, names in os.walk(sub):  # never descends into a symlinked folder
                for n in names:
                    p = Path(here, n)
                    try:
                        st = os.lstat(p)
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if n.startswith("."):  # a download in flight (Remote.get_file's temp file)
                        if n.endswith(".partial") and now - st.st_mtime > STALE_PARTIAL_S:
                            p.unlink(missing_ok=True)
                        continue
                    if p not in self._ledger.busy:
                        out.append((st.st_mtime, st.st_size, p))
        return out


def _file_id(file: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it is gone."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _touch(file: Path) -> bool:
    """Mark a file as just used; False when it is gone (evicted)."""
    try:
        os.utime(file)
        return True
    except FileNotFoundError:
        return False


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


class Prefetcher:
    """Fetches keys on a few background threads ahead of a reader, each key once at a time.

    The reader's own fetch of a key waits for the download in flight (the cache's lock per file)
    and raises its errors; the background ones are dropped.
    """

    def __init__(self, fetch: Callable[[Hashable], Any], threads: int = 4):
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saekit-download")
        self._pending: set[Hashable] = set()
        self._lock = threading.Lock()

    def want(self, keys: Iterable[Hashable]) -> None:
        with self._lock:  # held while submitting, so a fetch finishing at once is forgotten after it is noted
            for k in keys:
                if k not in self._pending:
                    self._pending.add(k)
                    self._pool.submit(self._run, k)

    def _run(self, key: Hashable) -> None:
        try:
            self._fetch(key)
        except Exception:  # noqa: S110 (the reader's own fetch raises it, in the reader's thread)
            pass
        finally:
            with self._lock:
                self._pending.discard(key)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

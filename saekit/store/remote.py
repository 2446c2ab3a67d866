"""Object storage: the one home of saekit's reads and writes at an fsspec URL (s3://, gs://, hf://, ...).

A `Remote` is a folder at a URL. saekit moves whole files only: a shard file, a completion record,
a zarr.json. On S3 and its kin a PUT is atomic (an object is there whole, or not at all), so the
same rules as on a local disk hold: a shard's record is written after its shard, and a store's
group zarr.json, which says "complete", last of all.

Credentials come only from the storage library's standard environment and configuration
(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_ENDPOINT_URL, ~/.aws; for
GCS: GOOGLE_APPLICATION_CREDENTIALS; for hf://: HF_TOKEN). saekit never reads them itself and never
writes them anywhere.

Every failure is one line (`SaekitError`): an unknown scheme, a missing package, no bucket, no
credentials, an endpoint that does not answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from saekit.atomic import writing
from saekit.errors import WRITE_PROBE, SaekitError, check_url, one_line, url_scheme

# fsspec's package for each common scheme, for a one-line "install it" message.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL saekit reads through fsspec (any scheme:// but file://)."""
    return url_scheme(path) not in (None, "file")


def local_file(root: Path, name: str) -> Path:
    """`root / name` for a '/'-separated `name` that came from outside (an object listing, a
    store's metadata), refused in one line unless it stays inside `root`: no absolute path, no
    empty, '.' or '..' part, no backslash or NUL, and no symlink on the way to it."""
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name:
        raise SaekitError(
            f"refusing the object name {name!r}: it is not a name inside a store, and would lead outside {root}; "
            "remove that object from the bucket"
        )
    path = root.joinpath(*parts)
    for p in [path, *path.parents]:
        if p == root:
            break
        if p.is_symlink():
            raise SaekitError(f"refusing to write {path}: {p} is a symlink, and saekit never follows one out of {root}")
    return path


def url_key(url: str) -> str:
    """A short stable name for a URL (cache and staging folder names)."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class Remote:
    """A folder at an fsspec URL (a `saekit.store.location.Location`). Names are '/'-separated paths relative to it."""

    hint = "check the URL and the bucket"  # what to check when nothing is found here

    def __init__(self, url: str):
        import fsspec  # lazy: only remote stores need it

        self.url = check_url(url)  # `s3://` alone names no bucket: one line
        scheme = self.url.split("://", 1)[0]
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            pkg = _PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
            raise SaekitError(f"{self.url}: reading {scheme}:// needs {pkg}; pip install {pkg}") from e
        except ValueError as e:  # fsspec: "Protocol not known"
            raise SaekitError(f"{self.url}: {one_line(e)}; use a URL fsspec knows (s3://, gs://, hf://, ...)") from e
        self.base = self.base.rstrip("/")

    def __repr__(self) -> str:
        return self.url

    @property
    def place(self) -> tuple:
        """Where this folder is, whatever the URL's spelling (s3:// and s3a:// are one file system):
        the file system's class and options, and the path in it."""
        fs = type(self.fs)
        options = json.dumps(self.fs.storage_options, sort_keys=True, default=str)
        return (f"{fs.__module__}.{fs.__qualname__}", options, self.base)

    def contains(self, other: object) -> bool:
        """True when `other` is this folder or inside it (s3:// and s3a:// are one place)."""
        if not isinstance(other, Remote):
            return False
        mine, theirs = self.place, other.place
        return mine[:2] == theirs[:2] and (theirs[2] + "/").startswith(mine[2] + "/")

    def path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn the storage library's exceptions into one line naming `what` and what to do."""
        try:
            yield
        except SaekitError:
            raise
        except FileNotFoundError as e:
            raise SaekitError(
                f"{what}: not found at {self.url} ({one_line(e, 120)}); check the URL and the bucket"
            ) from e
        except PermissionError as e:
            raise SaekitError(
                f"{what}: access denied at {self.url} ({one_line(e, 120)}); check the credentials in the storage library's standard environment"
            ) from e
        except Exception as e:  # botocore, aiohttp, gcsfs: many types for "no credentials" / "cannot connect"
            raise SaekitError(f"{what}: {type(e).__name__}: {one_line(e, 160)}; {_advice(e)}") from e

    # -- small objects ----------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes | None:
        """The object's bytes, None when it is not there."""
        with self.errors(f"reading {self.url}/{name}"):
            try:
                return self.fs.cat_file(self.path(name))
            except FileNotFoundError:
                return None

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.errors(f"writing {self.url}/{name}"):
            self.fs.pipe_file(self.path(name), data)

    def size(self, name: str) -> int | None:
        """Bytes of an object, None when it is not there (never a cached answer)."""
        with self.errors(f"reading {self.url}/{name}"):
            try:
                info = self.fs.info(self.path(name), refresh=True)
            except FileNotFoundError:
                return None
            return int(info["size"]) if info.get("type") == "file" else None

    def list(self, prefix: str = "") -> dict[str, int]:
        """name -> size of every object under `prefix` (recursively; fresh, not cached), but the
        write probes of `check_writable` a killed process may have left (never data)."""
        self.fs.invalidate_cache()
        with self.errors(f"listing {self.url}/{prefix}"):
            try:
                found = self.fs.find(self.path(prefix), detail=True)
            except FileNotFoundError:
                return {}
        cut = len(self.base) + 1
        return {
            p[cut:]: int(i["size"])
            for p, i in found.items()
            if i.get("type", "file") == "file" and not p.rsplit("/", 1)[-1].startswith(WRITE_PROBE)
        }

    def exists(self) -> bool:
        """True when the folder holds anything (or, for a bucket's root, the bucket is there)."""
        self.fs.invalidate_cache()
        with self.errors(f"reading {self.url}"):
            return bool(self.fs.exists(self.base))

    def remove(self, names: list[str]) -> None:
        if names:
            with self.errors(f"removing objects under {self.url}"):
                self.fs.rm([self.path(n) for n in names])

    def clear(self) -> None:
        """Remove every object under the folder."""
        self.remove(list(self.list()))

    def is_non_empty(self) -> bool:
        return bool(self.list())

    # -- whole files ------------------------------------------------------------------------------

    def put_file(self, local: Path, name: str) -> None:
        """Upload a local file as one object, then check the object is there with its size."""
        with self.errors(f"uploading {local} to {self.url}/{name}"):
            self.fs.put_file(str(local), self.path(name))
        want = local.stat().st_size
        got = self.size(name)
        if got != want:
            raise SaekitError(
                f"uploading {local} to {self.url}/{name}: the object has {got} bytes, not {want}; rerun to upload it again"
            )

    def get_file(self, name: str, local: Path) -> None:
        """Download one object to `local` atomically (temp file, then rename)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        with writing(local, f".{id(local)}.partial") as tmp, self.errors(f"downloading {self.url}/{name}"):
            self.fs.get_file(self.path(name), str(tmp))

    def in_place(self, name: str) -> Path | None:
        """None: an object is fetched before it is read (see `saekit.store.location.Location`)."""
        return None

    def writing(self, flag: str, kept: str, rerun: str) -> AbstractContextManager[object]:
        """Check the bucket takes writes (one line if not) before any work; see `Location.writing`."""
        self.check_writable()
        return nullcontext(self)

    def check_writable(self) -> None:
        """Write and remove a probe object: fails early (one line) on a missing bucket or no rights."""
        probe = f"{WRITE_PROBE}{os.getpid()}"
        self.write_bytes(probe, b"")
        self.remove([probe])


def _advice(e: BaseException) -> str:
    text = f"{type(e).__name__} {e}".lower()
    if "credential" in text or "signature" in text or "accessdenied" in text or "forbidden" in text:
        return "set credentials in the storage library's standard environment (e.g. AWS_PROFILE or AWS_ACCESS_KEY_ID)"
    if "connect" in text or "endpoint" in text or "timeout" in text or "resolve" in text:
        return "check the endpoint (AWS_ENDPOINT_URL for S3-compatible servers) and the network"
    return "check the URL, the credentials and the network, then rerun"


def each_parallel(fn: Callable[[Any], Any], items: list, threads: int) -> list:
    """fn over items on `threads` threads, results in order. The first error is raised once the
    items already running finish; items not yet started are not run (a rerun resumes)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor  # lazy: only parallel transfers need a pool

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saekit-remote") as pool:
        return list(pool.map(fn, items))

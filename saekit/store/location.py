"""Where a store lives: one small interface for a local directory and an fsspec URL.

A `Location` is a folder of whole files named by '/'-separated paths. `Local` is a directory on
this machine (a path, or a `file://` URL); `saekit.store.remote.Remote` is a folder at an fsspec URL
(s3://, gs://, hf://, ...). Both answer the same questions (read, write, list, size, remove,
put and get a whole file, writable?, inside another?), so a caller that moves files holds a
`Location` and never asks which kind it has. `location(where)` picks one.

Adding a storage backend is one class with these methods (see docs/architecture.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from saekit.atomic import read_regular, writing
from saekit.errors import WRITE_PROBE, SaekitError, check_url, is_non_empty, local_path, os_error_message, output_dir
from saekit.store.remote import Remote, is_remote, local_file
from saekit.store.shards import remove_entries


class Location(Protocol):
    """A folder of whole files; names are '/'-separated paths inside it (untrusted names are
    refused if they would lead outside it)."""

    url: str

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes, None when it is not there."""
        ...

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file: a reader sees the old one or the new one, never half of one."""
        ...

    def size(self, name: str) -> int | None:
        """Bytes of a file, None when it is not there."""
        ...

    def list(self, prefix: str = "") -> dict[str, int]:
        """name -> size of every file under `prefix` (recursively), write probes aside."""
        ...

    def exists(self) -> bool:
        """True when the folder is there."""
        ...

    def remove(self, names: list[str]) -> None:
        """Remove these files (a missing one is not an error)."""
        ...

    def clear(self) -> None:
        """Remove everything in the folder, but not the folder itself."""
        ...

    def is_non_empty(self) -> bool:
        """True when the folder holds a file (write probes aside)."""
        ...

    def put_file(self, local: Path, name: str) -> None:
        """Place the local file `local` here as `name`, whole."""
        ...

    def get_file(self, name: str, local: Path) -> None:
        """Copy file `name` to the local path `local`, whole."""
        ...

    def in_place(self, name: str) -> Path | None:
        """The file itself when it can be read where it lies (a memory map, a check without a
        copy); None when it must be fetched first (object storage)."""
        ...

    def writing(self, flag: str, kept: str, rerun: str) -> AbstractContextManager[object]:
        """Check the folder is writable before any work, and around the block turn a full disk
        or an OSError into one line naming `flag`, what is `kept` and how to `rerun`."""
        ...

    def contains(self, other: Location) -> bool:
        """True when `other` is this folder or inside it (same place, however spelled)."""
        ...

    @property
    def hint(self) -> str:
        """What to check when nothing is found here (a directory, or a URL and its bucket)."""
        ...


class Local:
    """A directory on this machine, with `Remote`'s methods."""

    hint = "pass the directory harvest wrote"

    def __init__(self, root: Path):
        self.root = root
        self.url = str(root)

    def __repr__(self) -> str:
        return self.url

    def file(self, name: str) -> Path:
        return local_file(self.root, name)

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return read_regular(self.file(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise SaekitError(os_error_message(e, f"cannot read {self.file(name)}")) from e

    def write_bytes(self, name: str, data: bytes) -> None:
        f = self.file(name)
        f.parent.mkdir(parents=True, exist_ok=True)
        with writing(f, ".partial") as tmp:  # a reader sees the old file or the new one, never half of one
            tmp.write_bytes(data)

    def size(self, name: str) -> int | None:
        f = self.file(name)
        return f.stat().st_size if f.is_file() else None

    def list(self, prefix: str = "") -> dict[str, int]:
        """name -> size of every entry but directories below the directory (another process's
        write probe aside). A FIFO or a device is listed too, so reading it says what it is."""
        top = self.file(prefix) if prefix else self.root
        if not top.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): (p.stat() if p.exists() else p.lstat()).st_size
            for p in top.rglob("*")
            if not p.is_dir() and not p.name.startswith(WRITE_PROBE)
        }

    def exists(self) -> bool:
        return self.root.exists()

    def remove(self, names: list[str]) -> None:
        for name in names:
            self.file(name).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.root.is_dir():
            remove_entries(self.root, [p.name for p in self.root.iterdir()])

    def is_non_empty(self) -> bool:
        return is_non_empty(self.root)

    def put_file(self, local: Path, name: str) -> None:
        """Copy `local` beside its final name, then rename: the file appears whole. A file staged
        beside it already (a `.partial` of this process) is renamed without a copy."""
        final = self.file(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if local.parent == final.parent and local.name.endswith(".partial"):
            os.replace(local, final)
            return
        with writing(final, f".{id(local)}.partial") as tmp:
            shutil.copyfile(local, tmp)

    def get_file(self, name: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with writing(local, f".{id(local)}.partial") as tmp:
            shutil.copyfile(self.file(name), tmp)

    def in_place(self, name: str) -> Path | None:
        return self.file(name)

    @contextmanager
    def writing(self, flag: str, kept: str, rerun: str) -> Iterator[object]:
        with output_dir(self.root, flag=flag, kept=kept, rerun=rerun):
            yield self

    def contains(self, other: Location) -> bool:
        if not isinstance(other, Local):
            return False
        mine, theirs = self.root.resolve(), other.root.resolve()
        return mine == theirs or mine in theirs.parents


def location(where: str | os.PathLike) -> Local | Remote:
    """A local directory or an fsspec URL (file:// is a local directory)."""
    where = str(where)
    if where.startswith("file://"):
        return Local(Path(where[len("file://") :]))
    return Remote(where) if is_remote(where) else Local(Path(where))


def output_place(where: str | os.PathLike, flag: str = "--out") -> Path | str:
    """Where a stage that writes to object storage or a local path writes: a checked URL
    (s3://, gs://, ...) or a local Path. Any other URL (file://, memory://) is one line."""
    if is_remote(where):
        return check_url(where, flag)
    return local_path(where, flag, why="harvest writes to a local path or to object storage (s3://, gs://, ...)")

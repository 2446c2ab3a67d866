"""Files and directories that appear whole or not at all, go away without leaving a half, and
are read without ever blocking.

Every file that must appear whole (a report, a record, zarr.json, a shard file, a plot, a
download) is written by `writing` (or `write_atomic`): a temporary name beside it, then one rename,
so a reader or a resumed writer sees the old file or the new one, never half of one.
Every swap-into-place of a directory saekit does (a checkpoint, an SAE directory, an export) goes through
`replace_dir`, and every deletion of a directory whose presence means "complete" goes through
`discard_dir`, so a kill between any two filesystem operations leaves something a rerun
recognises: the old directory or the new one in place, never half of one, and leftovers that the
next write removes first. `read_regular` is how saekit reads a small file it did not just write
(metadata, records, configs): only a regular file, so a FIFO or a device put where a file should
be is one line, never a read that waits forever.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saekit.errors import SaekitError, file_kind

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextmanager
def writing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends it is renamed over
    `path` in one step, and when the block fails it is removed. The temporary name is
    `.<name>.<pid><suffix>`, so a leftover of a killed writer is recognised by its suffix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` whole (see `writing`)."""
    with writing(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the directories `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    False where the system or the file system cannot (then nothing happened)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, not Linux
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def discard_dir(path: Path, marker: str | None = None) -> None:
    """Delete the directory `path` (nothing if it is not there). `marker`, the file whose presence
    says the directory is complete, goes first: a kill part way leaves a directory that no longer
    claims to be complete."""
    if marker is not None:
        try:
            (path / marker).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
    shutil.rmtree(path, ignore_errors=True)


def aside(path: Path) -> Path:
    """Where `replace_dir` keeps the old directory while it swaps without an atomic exchange."""
    return path.with_name(f"{path.name}.old")


def replace_dir(new: Path, path: Path, marker: str | None = None) -> None:
    """Put the complete directory `new` at `path`, in place of what is there, and delete that.

    Where the file system can, the two are exchanged in one atomic step, so `path` is the old
    directory or the new one at every moment. Elsewhere the old one is renamed to `aside(path)`
    first (a kill before the second rename leaves the old one there, complete), and one left
    there by an earlier kill is discarded once `path` is complete. `marker`: the file whose
    presence says a directory is complete (see `discard_dir`).
    """
    if not path.exists():
        new.rename(path)
        discard_dir(aside(path), marker)  # a kill between the two renames left the old one there
        return
    old = aside(path)
    discard_dir(old, marker)  # left by a kill in an earlier swap: `path` is complete
    if _rename_exchange(new, path):
        discard_dir(new, marker)  # now the old directory
        return
    path.rename(old)
    new.rename(path)
    discard_dir(old, marker)


def discard_leftovers(path: Path) -> None:
    """Remove what interrupted `publish_dir`s of `path` left beside it: the hidden temporary
    directories it names `.<name>.<8 random characters>`, and nothing else."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")
    for p in path.parent.iterdir() if path.parent.is_dir() else []:
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file `path` (FileNotFoundError when nothing is there). Anything else
    there (a FIFO, whose open waits for a writer; a device such as /dev/zero, which never ends; a
    socket) is one line saying what it is: the open never blocks, and nothing is read from it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SaekitError(
                f"{path} is {file_kind(mode)}, not a regular file: saekit reads only files there; replace it"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed with f
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def is_regular(path: str | os.PathLike) -> bool:
    """True when `path` is a regular file (a symlink to one counts; nothing is opened)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Busy(Exception):
    """Another process holds the lock."""


class _Held:
    """One flock this process holds, shared by its handles (`Lock`)."""

    def __init__(self, fd: int, key: tuple[int, int]):
        self.fd, self.key, self.users = fd, key, 0


_HELD: dict[tuple[int, int], _Held] = {}
_HELD_LOCK = threading.Lock()


class Lock:
    """An advisory lock (flock) on a directory or file against other processes, held until every
    handle of it in this process is released or gone (or the process ends: a killed process never
    leaves a stale lock). Writers in one process share it: a notebook that reopens a store it was
    writing is not refused. It keeps every other process out."""

    def __init__(self, path: str | os.PathLike):
        import fcntl  # lazy: POSIX only; only a lock needs it

        self._held: _Held | None = None
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is None:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise Busy(str(path)) from None
                held = _HELD[key] = _Held(fd, key)
            held.users += 1
        self._held = held

    def release(self) -> None:
        with _HELD_LOCK:
            held, self._held = self._held, None
            if held is None:
                return
            held.users -= 1
            if held.users == 0:
                _HELD.pop(held.key, None)
                os.close(held.fd)

    def __del__(self) -> None:
        self.release()

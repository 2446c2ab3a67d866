"""One exception type for every user-facing error, and one-line messages for failed file operations.

A `SaekitError` message is one line that says what is wrong and what to do. The CLI prints it
as `error: <message>` and exits non-zero, without a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SaekitError(Exception):
    """A user-facing error: bad input, a corrupt or incomplete store, a refused overwrite."""


def one_line(e: BaseException | str, limit: int = 200) -> str:
    """An exception's message (or any text) squeezed onto one line, for quoting inside a
    SaekitError: whitespace runs become one space; past `limit` characters it is cut at a word
    and marked with '...'. An empty message gives the exception's type name."""
    text = " ".join(str(e).split()) or (type(e).__name__ if isinstance(e, BaseException) else "(no message)")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


WRITE_PROBE = ".saekit-write-test-"  # + pid: `output_dir`'s check that --out is writable


def is_non_empty(path: Path) -> bool:
    """`path` is a file, or a directory with anything in it: an output written there could
    clobber something, so each command refuses it (with its own advice) unless told otherwise.
    Another process's write probe does not count (ranks of one torchrun probe at the same time)."""
    return path.exists() and (not path.is_dir() or any(not p.name.startswith(WRITE_PROBE) for p in path.iterdir()))


def is_disk_full(e: BaseException | None) -> bool:
    """True when `e`, or an exception it was raised from, is a full disk or an exceeded quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # safetensors (Rust) reports I/O errors as SafetensorError with the OS error in the text.
        if not isinstance(e, OSError) and any(f"(os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT)):
            return True
        # `raise ... from None` suppresses the context: the error it replaced is not its story
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False


_ADVICE = {
    errno.ENOSPC: "free space (or use another disk) and rerun; commands with --resume continue where they stopped",
    errno.EDQUOT: "free space or raise your quota and rerun; commands with --resume continue where they stopped",
    errno.EROFS: "choose a location on a writable file system",
    errno.EACCES: "choose a location you can write, or change its permissions",
    errno.EPERM: "choose a location you can write, or change its permissions",
    errno.ENAMETOOLONG: "use shorter names",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
    errno.EEXIST: "choose another path",
    errno.EISDIR: "give a file, not a directory",
    errno.ENOENT: "check the path",
}


def os_error_message(e: OSError, what: str | None = None) -> str:
    """One line for a failed file operation: what it was about, the system's reason, what to do."""
    where = what or (str(e.filename) if e.filename is not None else "a file operation")
    reason = e.strerror or type(e).__name__
    advice = _ADVICE.get(e.errno or 0, "check the path and its file system, then rerun")
    return f"{where}: {reason}; {advice}"


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)


def url_scheme(path: str | os.PathLike) -> str | None:
    """The scheme of a URL-shaped argument ('s3' for s3://bucket/x, 'file' for file://...), None for a
    plain path. The one test of "is this a URL" (saekit.store.remote.is_remote builds on it)."""
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def check_url(path: str | os.PathLike, flag: str = "") -> str:
    """A URL-shaped argument checked and normalised (scheme in lower case, no trailing '/'), a plain
    path as it is. A URL
    must name something after its scheme: `s3://` alone is one line, never a local folder `s3:`."""
    text = os.fspath(path)
    m = _URL.match(text)
    if m is None:
        return text
    if not m.group(2).strip("/"):
        scheme = m.group(1)
        raise SaekitError(
            f"{flag + ' ' if flag else ''}{text} names no bucket or folder after {scheme}://: pass e.g. {scheme}://BUCKET/PREFIX"
        )
    return f"{m.group(1).lower()}://{m.group(2)}".rstrip("/")  # schemes are case-insensitive (RFC 3986)


def local_path(
    path: str | os.PathLike,
    flag: str = "--out",
    why: str = "saekit writes its outputs to local paths only: pass a local directory (and copy it to object storage afterwards)",
) -> Path:
    """A path that must be local as a Path; a URL (s3://, gs://, memory://, file://...) is refused in
    one line (`why` says what to do) rather than taken for a local folder named `s3:`."""
    if _URL.match(os.fspath(path)):
        raise SaekitError(f"{flag} {path} is a URL, but {why}")
    return Path(path)


@contextmanager
def output_dir(
    path: str | os.PathLike, *, kept: str, rerun: str = "rerun the same command with --resume", flag: str = "--out"
) -> Iterator[Path]:
    """A stage's output directory, created and checked before any work; yields it as a Path.

    Refuses a file, an unwritable location or a too-long name in one line. Inside the block a
    full disk becomes one line saying what is kept (`kept`) and how to continue (`rerun`), and any
    other OSError one line naming its path. A directory made here that is still empty when the
    block fails is removed, so a failed start leaves nothing behind.
    """
    out = local_path(path, flag)
    made = False
    try:
        if out.exists() and not out.is_dir():
            raise SaekitError(f"{flag} {out} is a file, not a directory: choose a directory path (or move the file)")
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{WRITE_PROBE}{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        _remove_if_empty(out, made)
        raise SaekitError(os_error_message(e, f"cannot write {flag} {out}")) from e
    try:
        yield out
    except BaseException as e:
        _remove_if_empty(out, made)
        if is_disk_full(e):
            raise SaekitError(
                f"disk full while writing {out}: free space (or move {out} to a bigger disk), then {rerun}; {kept}"
            ) from e
        if isinstance(e, OSError):
            raise SaekitError(os_error_message(e)) from e
        raise


def _remove_if_empty(path: Path, made: bool) -> None:
    if made:
        try:
            path.rmdir()  # only succeeds while empty
        except OSError:
            pass


def path_mode(path: Path, flag: str) -> int | None:
    """`path`'s st_mode (following links), None when nothing is there; unreadable is an error."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SaekitError(f"{flag} {path} cannot be read ({e.strerror or e}): check its permissions") from e


def file_kind(mode: int) -> str:
    """What a st_mode is, in words, for messages ("a FIFO (named pipe)", "a file", ...)."""
    kinds = [
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a file"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a file")

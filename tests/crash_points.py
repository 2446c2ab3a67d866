"""Kill points reached deterministically, with no timing: `dies_at(n)` makes the process "die"
just before its n-th filesystem change. That change and every one after it never happen (each
raises `Died`, so no cleanup handler can touch the disk either), which is what a SIGKILL there
leaves on disk. `kill_points(fn)` counts the changes `fn` makes, so a test can try every point.

Counted: creating, replacing, renaming or deleting a file or directory (os.mkdir, os.rename,
os.replace, os.unlink, os.remove, os.rmdir), opening a file to write (open, io.open), writing a
safetensors file, and an atomic directory exchange (`saekit.atomic._rename_exchange`). Nothing
of saekit's own logic is replaced: the operations run for real up to the kill point.
"""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


class Died(BaseException):
    """The process died here: nothing after this point touched the disk."""


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


@contextmanager
def dies_at(n: float, exchange: bool = True) -> Iterator[list[int]]:
    """Every filesystem change from the n-th on raises Died (n = inf: none does; the list holds
    the count). exchange=False: the file system cannot exchange directories atomically."""
    import safetensors.torch

    import saekit.atomic

    count = [0]
    mp = pytest.MonkeyPatch()

    def gate():
        count[0] += 1
        if count[0] >= n:
            raise Died(f"killed before filesystem change {count[0]}")

    def wrap(fn: Callable) -> Callable:
        def inner(*a, **k):
            gate()
            return fn(*a, **k)

        return inner

    def wrap_open(fn: Callable) -> Callable:
        def inner(file, mode="r", *a, **k):
            if _writes(mode):
                gate()
            return fn(file, mode, *a, **k)

        return inner

    for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir"):
        mp.setattr(os, name, wrap(getattr(os, name)))
    mp.setattr(builtins, "open", wrap_open(builtins.open))
    mp.setattr(io, "open", wrap_open(io.open))
    mp.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file))
    real_exchange = saekit.atomic._rename_exchange
    mp.setattr(saekit.atomic, "_rename_exchange", wrap(real_exchange if exchange else lambda a, b: False))
    try:
        yield count
    finally:
        _drain_zarr()  # writes zarr had in flight meet the kill too, before the disk comes back
        mp.undo()


def _drain_zarr() -> None:
    """Wait until zarr's event loop has finished every task it started (each filesystem change
    they still make fails like the rest): a killed process has no threads left writing."""
    import asyncio
    import sys

    sync = sys.modules.get("zarr.core.sync")
    if sync is None or sync.loop[0] is None:
        return

    async def idle() -> None:
        while len(asyncio.all_tasks()) > 1:
            await asyncio.sleep(0)

    sync.sync(idle())


def kill_points(fn: Callable[[], None], exchange: bool = True) -> range:
    """1 .. the number of filesystem changes `fn` makes (it runs once, to count them)."""
    with dies_at(float("inf"), exchange) as count:
        fn()
    return range(1, count[0] + 1)


def run_until_killed(fn: Callable[[], None], n: int, exchange: bool = True) -> bool:
    """Run `fn` with the kill at point n; True when it died there."""
    try:
        with dies_at(n, exchange):
            fn()
    except Died:
        return True
    return False


def stop_training_at_step(monkeypatch, n: int) -> None:
    """Make `saekit train`'s n-th optimizer step raise KeyboardInterrupt (Ctrl-C there) instead of
    running; the steps before it run for real. `monkeypatch.undo()` or a new patch restores it."""
    import saekit.train.stage

    real, calls = saekit.train.stage.train_step, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(saekit.train.stage, "train_step", stop)

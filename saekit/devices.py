"""Devices, dtypes and process groups, resolved once for every stage.

Every command accepts the same --device values and gives the same one-line error for any other;
every dtype name (an SAE's `dtype`, harvest's `--dtype`) comes from one table.

Under `torchrun --nproc_per_node N ...` (RANK / WORLD_SIZE / LOCAL_RANK set), `init_dist()` joins
the process group (nccl on CUDA, gloo on CPU). Without those variables the collectives here are
cheap single-process stand-ins, so library code calls the same functions either way.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch
import torch.distributed as td

from saekit.errors import SaekitError

T = TypeVar("T")

DEVICES = "auto, cpu, cuda or cuda:N"

# Every dtype name saekit accepts, with the short aliases harvest's --dtype has always taken.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_DTYPE_CHOICES = "auto, float32 (fp32), bfloat16 (bf16), float16 (fp16) or float64 (fp64)"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N'. Anything else (tpu, gpu,
    mps, a typo) and CUDA without a GPU are one-line errors, before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if m is None:
        raise SaekitError(f"unknown --device {device!r}: use {DEVICES}")
    if not torch.cuda.is_available():
        raise SaekitError(f"--device {device} but no CUDA GPU is visible: use --device cpu or --device auto")
    n = torch.cuda.device_count()
    if m[1] is not None and int(m[1]) >= n:
        raise SaekitError(f"--device {device} but only {n} CUDA GPU(s) are visible: use cuda:0 to cuda:{n - 1}")
    return torch.device(device)


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device | None = None, *, what: str = "dtype"
) -> torch.dtype:
    """A torch dtype from a name in DTYPES ('torch.' prefix allowed) or a dtype.

    None/'auto' -> bf16 on a GPU (tensor cores), fp32 on the CPU or without a device (bf16
    matmuls are slow there). `what` names the setting in the error (e.g. '--dtype').
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise SaekitError(f"unknown {what} {dtype!r}: use {_DTYPE_CHOICES}")
    return DTYPES[name]


def device_clock(device: torch.device) -> float:
    """time.perf_counter() once the work queued on `device` is done (CUDA runs asynchronously),
    so that differences of it time device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', ...: the name saved in configs and metadata."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Process groups (torchrun)
# ---------------------------------------------------------------------------------------------


class Dist(NamedTuple):
    """Where this process sits: rank of world_size, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # init_dist() created the process group, so shutdown_dist() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this rank's device.

    device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun
    with CUDA, rank r uses cuda:LOCAL_RANK. A process group the caller already started is used
    as it is, and `shutdown_dist` leaves it alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    owns = world > 1 and not td.is_initialized()
    if owns:
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev, owns)


def shutdown_dist(d: Dist) -> None:
    """End the process group if `init_dist` (which returned `d`) started it; a caller's is kept."""
    if d.owns_group and td.is_available() and td.is_initialized():
        td.destroy_process_group()


def _distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "max" or "mean") across ranks; identity with one process."""
    if _distributed():
        if op == "mean":
            td.all_reduce(t, td.ReduceOp.SUM)
            t /= td.get_world_size()
        else:
            td.all_reduce(t, {"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op])
    return t


def barrier() -> None:
    if td.is_available() and td.is_initialized():
        td.barrier()


def broadcast_error(message: str | None) -> str | None:
    """Share rank 0's error message (or None) with every rank, so all ranks stop together."""
    return broadcast_object(message)


@overload
def on_main(fn: Callable[[], T], main: bool, share: Literal[True]) -> T: ...
@overload
def on_main(fn: Callable[[], T], main: bool, share: Literal[False] = False) -> T | None: ...
def on_main(fn: Callable[[], T], main: bool, share: bool = False) -> T | None:
    """fn() on the main rank; a SaekitError it raises is raised on every rank, so all ranks stop
    together (a collective: every rank calls this). Its result stays on the main rank (None
    elsewhere), or with `share` every rank gets it (it must then be picklable)."""
    result, err = None, None
    if main:
        try:
            result = fn()
        except SaekitError as e:
            err = str(e)
    err = broadcast_error(err)
    if err is not None:
        raise SaekitError(err)
    return broadcast_object(result) if share else result


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable, saekit's own) on every rank; itself without torchrun."""
    if not _distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]

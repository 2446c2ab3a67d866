"""torch.distributed helpers: one process per device under `torchrun`, a no-op without it.

`torchrun --nproc_per_node N ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` then joins the
process group (nccl on CUDA, gloo on CPU). Without those variables everything here is a cheap
single-process stand-in, so library code calls the same functions either way.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as td

from saekit.devices import resolve_device


class Dist(NamedTuple):
    """Where this process sits: rank of world_size, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # init() created the process group, so shutdown() should end it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this rank's device.

    device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". Under torchrun
    with CUDA, rank r uses cuda:LOCAL_RANK.
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


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "max" or "mean") across ranks; identity with one process."""
    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
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
    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return message
    box = [message]
    td.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(d: Dist | None = None) -> None:
    """End the process group: given `init`'s Dist, only if init started it (a caller's is kept)."""
    if (d is None or d.owns_group) and td.is_available() and td.is_initialized():
        td.destroy_process_group()

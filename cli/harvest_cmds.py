"""`saekit harvest`: run a model over texts once and fill an activation store."""

from __future__ import annotations

import typer

from saekit.harvest import HarvestConfig, run

from .commands import Command


def harvest(cfg: HarvestConfig) -> None:
    """Harvest activations into a store. Under `torchrun --nproc_per_node N` the ranks split the work."""
    res = run(cfg)
    if res.content_hash:  # rank 0
        typer.echo(f"{res.path}  {res.n_rows:,} rows  {res.content_hash}")


COMMAND = Command(
    "harvest",
    HarvestConfig,
    harvest,
    interrupted="finished shards are kept; rerun the same command with --resume to continue",
)

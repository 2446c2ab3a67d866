"""`saekit pursue`: sparse codes for a whole cache by pursuit, compared with the SAE's encoder."""

from __future__ import annotations

import typer

from saekit.pursue import PursueConfig, run

from .commands import Command


def pursue(cfg: PursueConfig) -> None:
    """Run pursuit methods at each k over a store's held-out rows; report FVU and L0 against the encoder."""
    res = run(cfg)
    typer.echo(res.table)
    typer.echo(f"report: {res.out / 'report.md'}")


COMMAND = Command(
    "pursue",
    PursueConfig,
    pursue,
    interrupted="finished code shards are kept; rerun the same command with --resume to continue",
)

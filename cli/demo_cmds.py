"""`saekit demo`: harvest -> train -> pursue on the embedded default, then print the report."""

from __future__ import annotations

import typer

from saekit.demo import DemoConfig, run

from .commands import Command


def demo(cfg: DemoConfig) -> None:
    """Run the whole pipeline offline on the embedded model and corpus (about 40 s on 2 CPU cores)."""
    res = run(cfg)
    typer.echo(res.pursue.table)
    typer.echo(res.headline())
    typer.echo(f"report: {res.pursue.out / 'report.md'}  plot: {res.pursue.out / 'fvu_vs_l0.png'}")
    if res.dashboard is not None:
        typer.echo(f"dashboard: {res.dashboard}  (open it in a browser)")


COMMAND = Command("demo", DemoConfig, demo, interrupted="finished stages are kept; rerun the same command to continue")

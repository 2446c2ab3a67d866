"""`saekit demo`: harvest -> train -> pursue on the embedded default, then print the report."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    out: Annotated[str, typer.Option(help="Directory for the three stages' outputs; rerunning reuses what is finished.")] = "cache/demo",
    tokens: Annotated[int, typer.Option(help="Rows to harvest from the embedded model.")] = 200_000,
    steps: Annotated[int, typer.Option(help="SAE training steps.")] = 2000,
    rows: Annotated[int, typer.Option(help="Rows the encoder and the pursuits are compared on.")] = 8192,
    device: Annotated[str, typer.Option(help="cpu (what the demo is sized for), auto or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch CPU threads; 0: torch's default. One is as fast here and immune to a busy core.")] = 1,
) -> None:
    """Run the whole pipeline offline on the embedded model and corpus (about 30 s on 2 CPU cores)."""
    from saekit.demo import DemoConfig, run

    res = run(DemoConfig(out=out, tokens=tokens, steps=steps, rows=rows, device=device, threads=threads))
    typer.echo(res.pursue.table)
    typer.echo(res.headline())
    typer.echo(f"report: {res.pursue.out / 'report.md'}  plot: {res.pursue.out / 'fvu_vs_l0.png'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)

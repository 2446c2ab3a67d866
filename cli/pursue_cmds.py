"""`saekit pursue`: sparse codes for a whole cache by pursuit, compared with the SAE's encoder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def pursue(
    store: Annotated[Optional[str], typer.Option(help="Activation store written by `saekit harvest`.")] = None,
    sae: Annotated[Optional[str], typer.Option(help="Dictionary + encoder: a train run dir, a saekit SAE dir, a local sae-lens dir, or sae-lens RELEASE/ID.")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="Nonzeros per row; repeat for several (e.g. --k 16 --k 32).")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Pursuit: gp, cgp, mp or omp (slow); repeat for several. Default: gp and mp.")] = None,
    hook: Annotated[Optional[str], typer.Option(help="Hook to read; default: the store's only hook.")] = None,
    rows: Annotated[int, typer.Option(help="Use the first N rows of the store; 0: all.")] = 0,
    encoder: Annotated[Optional[list[str]], typer.Option("--encoder", help="Extra encoder to compare (e.g. an MLP-encoder run dir); repeat for several.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    out: Annotated[Optional[str], typer.Option(help="Output directory: codes.zarr, report.json, report.md, fvu_vs_l0.png.")] = None,
) -> None:
    """Run pursuit methods at each k over the first rows of a store; report FVU and L0 against the encoder."""
    from saekit.pursue import PursueConfig, run

    cfg = PursueConfig(
        store=store or "", sae=sae or "", out=out or "", k=list(k or []), methods=list(method or ["gp", "mp"]),
        hook=hook, rows=rows, encoders=list(encoder or []), batch_size=batch_size, device=device, resume=resume,
    )  # fmt: skip
    res = run(cfg)
    typer.echo(res.table)
    typer.echo(f"report: {res.out / 'report.md'}")


def register(app: typer.Typer) -> None:
    app.command("pursue")(pursue)

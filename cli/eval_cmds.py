"""`saekit eval`: each encoding's reconstruction spliced back into the model, CE and KL beside FVU and L0."""

from __future__ import annotations

import typer

from saekit.eval import EvalConfig, run

from .commands import Command


def run_eval(cfg: EvalConfig) -> None:
    """Splice each encoding's reconstruction into the model at the hook: CE, ΔCE, CE loss recovered and
    KL(clean ‖ spliced) on the store's held-out sequences, beside FVU and L0 (see docs/eval.md)."""
    res = run(cfg)
    typer.echo(res.table)
    typer.echo(f"report: {res.out / 'report.md'}")


COMMAND = Command("eval", EvalConfig, run_eval)

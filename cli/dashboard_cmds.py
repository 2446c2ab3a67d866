"""`saekit dashboard`: a static site showing what each latent means, under the encoder and pursuit codes."""

from __future__ import annotations

import typer

from saekit.dashboard import DashboardConfig, run

from .commands import Command


def dashboard(cfg: DashboardConfig) -> None:
    """Write a static site (index.html, one page per latent): density, histogram, top-activating and
    lower-quantile contexts, logit effects and nearest latents; with --codes, encoder and pursuit side by side."""
    res = run(cfg)
    if res.note:
        typer.echo(f"note: {res.note}")
    typer.echo(f"index: {res.index}")


COMMAND = Command("dashboard", DashboardConfig, dashboard)

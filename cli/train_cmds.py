"""`saekit train`: one flag per `TrainConfig` field; with --resume the run's saved config.json is
the lowest layer under the --config file and the flags (see `saekit.cli.commands`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from saekit.train import read_run_config, run
from saekit.train.config import TrainConfig

from .commands import Command


def train(cfg: TrainConfig) -> None:
    """Train an SAE, an encoder against a frozen dictionary, or a dictionary under pursuit/MLP codes.

    Under `torchrun --nproc_per_node N` the ranks train one model with DDP, each reading its own share of the store.
    """
    res = run(cfg)
    if res.eval:  # rank 0
        fvu = res.eval.get("eval/fvu", float("nan"))
        extra = f", pursuit fvu {res.eval['eval/pursuit_fvu']:.4f}" if "eval/pursuit_fvu" in res.eval else ""
        typer.echo(f"{res.out}  {res.steps} steps  held-out fvu {fvu:.4f}, l0 {res.eval['eval/l0']:.1f}{extra}")


def saved_run_config(values: dict[str, Any]) -> dict[str, Any]:
    """With --resume, the run's saved config.json (so `saekit train --out runs/x --resume` is enough)."""
    out = values.get("out")
    if values.get("resume") and out and _is_file(Path(out) / "config.json"):
        return read_run_config(out)
    return {}


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long: `run` says so in one line
        return False


COMMAND = Command(
    "train",
    TrainConfig,
    train,
    saved=saved_run_config,
    interrupted="the last checkpoint is kept; rerun the same command with --resume to continue",
)

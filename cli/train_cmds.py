"""`saekit train`: one flag per `TrainConfig` field (help text = the field's docstring).

Precedence, lowest first: the field defaults; with --resume, the run's saved config.json; the
--config file (TOML, YAML or JSON); the flags given on the command line. A flag not given is
None here, so it never overrides the file.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional

import typer

# TrainConfig's annotations are strings (postponed evaluation); these are all it uses.
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "str | None": str, "bool | None": bool}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source, never executed)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def merge_config(config: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """defaults < saved run config (with --resume) < --config file < flags given; each file is
    checked on its own, so an error names the file that holds the bad value."""
    from saekit.train import TrainConfig, read_config_file, read_run_config

    merged: dict[str, Any] = {}
    out, resume = given.get("out"), given.get("resume")
    if resume and out and _is_file(Path(out) / "config.json"):
        merged |= read_run_config(out)
    if config:
        merged |= TrainConfig.check_dict(read_config_file(config), f"--config {config}")
    merged |= {k: v for k, v in given.items() if v is not None}
    return merged


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long: `run` says so in one line
        return False


def train(config: str | None = None, **given: Any) -> None:
    """Train an SAE, an encoder against a frozen dictionary, or a dictionary under pursuit/MLP codes.

    Under `torchrun --nproc_per_node N` the ranks train one model with DDP, each reading its own share of the store.
    """
    from saekit.train import TrainConfig, run

    cfg = TrainConfig.from_dict(merge_config(config, given), source=f"--config {config}" if config else "flags")
    res = run(cfg)
    if res.eval:  # rank 0
        fvu = res.eval.get("eval/fvu", float("nan"))
        extra = f", pursuit fvu {res.eval['eval/pursuit_fvu']:.4f}" if "eval/pursuit_fvu" in res.eval else ""
        typer.echo(f"{res.out}  {res.steps} steps  held-out fvu {fvu:.4f}, l0 {res.eval['eval/l0']:.1f}{extra}")


def _signature() -> inspect.Signature:
    from saekit.train import TrainConfig

    docs = field_docs(TrainConfig)
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--config", help="TOML, YAML or JSON file of these settings (keys as the flag names); flags given override it."),
        )
    ]  # fmt: skip
    for f in fields(TrainConfig):
        kind = _TYPES[str(f.type)]
        flag = f.name.replace("_", "-")
        decl = f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"
        default = "" if f.default is MISSING or f.default in ("", None) else f" [default: {f.default}]"
        option = typer.Option(None, decl, help=docs.get(f.name, "") + default, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    return inspect.Signature(params)


def register(app: typer.Typer) -> None:
    def command(**kwargs: Any) -> None:
        train(**kwargs)

    sig = _signature()
    command.__signature__ = sig  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    command.__doc__ = train.__doc__
    app.command("train")(command)

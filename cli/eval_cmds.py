"""`saekit eval`: one flag per `EvalConfig` field (help text = the field's docstring), as
`saekit train` generates its flags; `--config FILE` takes the same settings from a file, and
flags given override it."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from typing import Any, Optional

import typer

from cli.train_cmds import field_docs

# EvalConfig's annotations are strings (postponed evaluation); these are all it uses.
_TYPES = {"int": int, "str": str, "bool": bool, "str | None": str, "list[str]": list[str], "list[int]": list[int]}


def evaluate(config: str | None = None, **given: Any) -> None:
    """Splice each encoding's reconstruction into the model at the hook: CE, ΔCE, CE loss recovered
    and KL(clean ‖ spliced) on the store's held-out sequences, beside FVU and L0 (docs/eval.md)."""
    from saekit.config import check_types
    from saekit.errors import SaekitError
    from saekit.eval import EvalConfig, run
    from saekit.train import read_config_file

    names = {f.name for f in fields(EvalConfig)}
    merged: dict[str, Any] = {}
    if config:
        data = {str(k).replace("-", "_"): v for k, v in read_config_file(config).items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SaekitError(f"--config {config} has unknown key(s) {', '.join(unknown)}; see `saekit eval --help` for the names")
        merged |= check_types(EvalConfig, data, f"--config {config}")
    merged |= {k: v for k, v in given.items() if v is not None and v != []}
    res = run(EvalConfig(**merged))
    typer.echo(res.table)
    typer.echo(f"report: {res.out / 'report.md'}")


def _signature() -> inspect.Signature:
    from saekit.eval import EvalConfig

    docs = field_docs(EvalConfig)
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--config", help="TOML, YAML or JSON file of these settings (keys as the field names); flags given override it."),
        )
    ]  # fmt: skip
    for f in fields(EvalConfig):
        kind = _TYPES[str(f.type)]
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        value = f.default_factory() if f.default_factory is not MISSING else f.default
        default = "" if value in ("", None, []) else f" [default: {', '.join(map(str, value)) if isinstance(value, list) else value}]"
        option = typer.Option(None, decl, help=docs.get(f.name, "") + default, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    return inspect.Signature(params)


def register(app: typer.Typer) -> None:
    def command(**kwargs: Any) -> None:
        evaluate(**kwargs)

    sig = _signature()
    command.__signature__ = sig  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    command.__doc__ = evaluate.__doc__
    app.command("eval")(command)

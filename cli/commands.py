"""One mechanism for every command: its flags are generated from its config dataclass.

A command is a `Command`: a name, the config dataclass of its stage, and an action that takes the
built config, calls the library and prints. `add_command` gives the command one flag per field
(`n_features` -> `--n-features`; help = the field's docstring and its default), plus
`--config FILE`. A field's metadata may rename its flag (`hooks` -> `--hook`, given once per hook)
or make it a required positional argument (`argument="STORE"`); a bool field is `--x/--no-x`.

Precedence, lowest first: the field defaults; the command's saved settings (`saekit train
--resume`: the run's config.json); the --config file (TOML, YAML or JSON, keys as the field or
flag names); the flags given. A flag not given is None here, so it never overrides: defaults are
written once, in the dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, NamedTuple, Optional

import typer

from saekit.config import check_dict, flag_of, read_config_file

CONFIG_HELP = "TOML, YAML or JSON file of these settings (keys as the flag names); flags given override it."


class Command(NamedTuple):
    """One `saekit` command."""

    name: str
    config: type
    """The stage's config dataclass: one flag per field."""
    action: Callable[[Any], None]
    """Runs the library on the built config and prints the result; its docstring is the command's help."""
    interrupted: str = ""
    """What Ctrl-C leaves behind and how to continue ('' : the command just stops)."""
    saved: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Settings saved by an earlier run, given the file and flag values (train --resume: config.json)."""


def add_command(app: typer.Typer, cmd: Command) -> None:
    """Register `cmd` on `app` with its generated flags."""

    def callback(config: str | None = None, **given: Any) -> None:
        cfg = build_config(cmd, config, given)
        try:
            cmd.action(cfg)
        except KeyboardInterrupt:  # typer would exit 130 silently, or show a traceback from the library
            typer.echo(f"interrupted: {cmd.interrupted}" if cmd.interrupted else "interrupted", err=True)
            raise typer.Exit(130) from None

    sig = signature(cmd.config)
    callback.__signature__ = sig  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    callback.__doc__ = cmd.action.__doc__
    app.command(cmd.name)(callback)


# --------------------------------------------------------------------------------------------
# Flags from fields
# --------------------------------------------------------------------------------------------


def signature(cls: type) -> inspect.Signature:
    """`--config` and one keyword parameter per field of `cls`, each defaulting to None."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    config = typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE", show_default=False)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=Optional[str])]  # noqa: UP045 (typer reads typing.Optional)
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(fields(cls), key=lambda f: f.name not in own):  # a shared base's flags (--cache-dir) last
        assert f.name != "config", f"{cls.__name__}.config would shadow --config"
        kind = _flag_type(hints[f.name])
        text = " ".join(filter(None, [docs.get(f.name, ""), _default_text(f)]))
        if "argument" in f.metadata:
            param = typer.Argument(..., metavar=f.metadata["argument"], help=text, show_default=False)
        else:
            flag = flag_of(f)
            decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
            param = typer.Option(None, decl, help=text, show_default=False)
        annotation = Optional[kind]  # noqa: UP045 (typer reads typing.Optional)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=param, annotation=annotation))
    return inspect.Signature(params)


def _flag_type(tp: Any) -> Any:
    """The type click parses a flag's value as: `X | None` -> X; `list[X]` stays (a repeatable flag)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp


def _default_text(f: Field) -> str:
    """'(default: X)' from the dataclass, or '' where the default means "not set". Round brackets:
    rich would take '[default: X]' for markup and drop it."""
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value in ("", None, []) or value is MISSING:
        return ""
    if isinstance(value, bool):
        shown = flag_of(f) if value else "--no-" + flag_of(f)[2:]
    else:
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
    return f"(default: {shown})"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of the dataclasses it extends (read from
    their source, never executed)."""
    docs = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            docs |= _own_field_docs(c)
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(tree, ast.ClassDef)
    body = tree.body
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


# --------------------------------------------------------------------------------------------
# The config from defaults, saved settings, the --config file and the flags
# --------------------------------------------------------------------------------------------


def build_config(cmd: Command, config: str | None, given: dict[str, Any]) -> Any:
    """cmd.config from defaults < saved settings < --config file < flags given. Each file is
    checked on its own, so an error names the file that holds the bad value."""
    flags = {k: v for k, v in given.items() if v is not None}  # None: a flag not given
    file = (
        check_dict(cmd.config, read_config_file(config), f"--config {config}", f"saekit {cmd.name} --help")
        if config
        else {}
    )
    saved = cmd.saved(file | flags) if cmd.saved else {}
    return cmd.config(**(saved | file | flags))

"""`saekit` entry point: one table of commands, each generated the same way (`saekit.cli.commands`),
and every error as one line.

A SaekitError, and as a safety net any OSError a command lets escape (a full disk, a read-only
file system, ...), is printed as `error: <one line>` with exit status 1; a usage error (an
unknown flag, a value of the wrong type, a missing argument) as `error: <click's message>; see
saekit <cmd> --help` with exit status 2; Ctrl-C prints one line saying how to continue, with exit
status 130. Never a traceback, never a usage box.
"""

import sys
from typing import Any

import typer

from saekit.errors import SaekitError, os_error_message

from . import dashboard_cmds, demo_cmds, eval_cmds, harvest_cmds, pursue_cmds, store_cmds, train_cmds
from .commands import add_command

app = typer.Typer(
    name="saekit",
    help="Sparse autoencoders on transformer activations: harvest once, train and pursue many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# In CLI order.
COMMANDS = [
    harvest_cmds.COMMAND,
    train_cmds.COMMAND,
    pursue_cmds.COMMAND,
    eval_cmds.COMMAND,
    dashboard_cmds.COMMAND,
    *store_cmds.COMMANDS,
    demo_cmds.COMMAND,
]
for _command in COMMANDS:
    add_command(app, _command)

# click's base exception, reached through typer's public BadParameter: typer (since 0.26) vendors
# click as a private module, and an installed `click` package would be another copy.
ClickError: type[Exception] = typer.BadParameter.__mro__[2]  # BadParameter -> UsageError -> ClickException


def main() -> None:
    # Without click's standalone mode, usage errors come here instead of being printed in a box;
    # a SaekitError is a user-facing error: one line, non-zero exit, no traceback.
    try:
        code = app(prog_name="saekit", standalone_mode=False)
    except ClickError as e:  # usage: an unknown flag, a value of the wrong type, a missing argument
        if type(e).__name__ != "NoArgsIsHelpError":  # bare `saekit` has printed the help already
            typer.echo(error_line(usage_error_line(e)), err=True)
        sys.exit(getattr(e, "exit_code", 2))  # 2 for usage errors, as click says
    except SaekitError as e:
        typer.echo(error_line(str(e)), err=True)
        sys.exit(1)
    except OSError as e:  # the safety net; the stages say more specific things where they can
        typer.echo(error_line(os_error_message(e)), err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) from a command returns its code


def error_line(message: str) -> str:
    """`error: <message>` on one line whatever the message quotes: a newline, a carriage return
    or a terminal escape (e.g. in a path) is shown escaped, as Python writes it."""
    shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
    return f"error: {shown}"


def usage_error_line(e: Any) -> str:
    """click's message on one line (e: a click exception), and where to look: `saekit <cmd> --help`."""
    message = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        where = ctx.command_path
    else:  # some parser errors carry no context: name the command from the arguments
        where = " ".join(["saekit", *[a for a in sys.argv[1:2] if a in {c.name for c in COMMANDS}]])
    return f"{message}; see {where} --help"


if __name__ == "__main__":
    main()

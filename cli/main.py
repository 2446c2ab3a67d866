"""`saekit` entry point: registers each stage's commands and turns errors into one line.

A SaekitError, and as a safety net any OSError a command lets escape (a full disk, a read-only
file system, ...), is printed as `error: <one line>` with exit status 1; Ctrl-C prints one line
saying how to continue, with exit status 130. Never a traceback.
"""

import functools
import sys

import typer

from saekit.errors import SaekitError, os_error_message

app = typer.Typer(
    name="saekit",
    help="Sparse autoencoders on transformer activations: harvest once, train and pursue many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# What Ctrl-C leaves behind, per command (commands that write nothing just stop).
_INTERRUPTED = {
    "harvest": "finished shards are kept; rerun the same command with --resume to continue",
    "train": "the last checkpoint is kept; rerun the same command with --resume to continue",
    "pursue": "finished code shards are kept; rerun the same command with --resume to continue",
    "demo": "finished stages are kept; rerun the same command to continue",
}


def _register() -> None:
    # Each module adds its commands to `app`; keep this list in CLI order.
    from cli import demo_cmds, eval_cmds, harvest_cmds, pursue_cmds, store_cmds, train_cmds

    harvest_cmds.register(app)
    train_cmds.register(app)
    pursue_cmds.register(app)
    eval_cmds.register(app)
    store_cmds.register(app)
    demo_cmds.register(app)
    for info in app.registered_commands:
        info.callback = _interruptible(info.name or info.callback.__name__, info.callback)


def _interruptible(name: str, command):
    """The command, printing one line on Ctrl-C (typer would exit 130 silently, or show a traceback
    from inside the library)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            what = _INTERRUPTED.get(name)
            typer.echo(f"interrupted: {what}" if what else "interrupted", err=True)
            raise typer.Exit(130) from None

    return run


_register()


def main() -> None:
    # Standalone mode lets click handle --help, usage errors and typer.Exit; a SaekitError is a
    # user-facing error: one line, non-zero exit, no traceback.
    try:
        app()
    except SaekitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # the safety net; the stages say more specific things where they can
        typer.echo(f"error: {os_error_message(e)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

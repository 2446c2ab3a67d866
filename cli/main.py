"""`saekit` entry point: registers each stage's commands and turns SaekitError into one line."""

import sys

import typer

from saekit.errors import SaekitError

app = typer.Typer(
    name="saekit",
    help="Sparse autoencoders on transformer activations: harvest once, train and pursue many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its commands to `app`; keep this list in CLI order.
    from cli import demo_cmds, harvest_cmds, pursue_cmds, store_cmds, train_cmds

    harvest_cmds.register(app)
    train_cmds.register(app)
    pursue_cmds.register(app)
    store_cmds.register(app)
    demo_cmds.register(app)


_register()


def main() -> None:
    # Standalone mode lets click handle --help, usage errors and typer.Exit; a SaekitError is a
    # user-facing error: one line, non-zero exit, no traceback.
    try:
        app()
    except SaekitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

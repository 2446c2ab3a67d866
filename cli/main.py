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
    from cli import store_cmds

    store_cmds.register(app)


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except SaekitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:  # raised by --help / explicit exits
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

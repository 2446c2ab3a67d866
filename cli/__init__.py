"""The saekit command-line interface (typer). Thin: each command builds a config and calls the library."""

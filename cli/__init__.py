"""The saekit command-line interface (typer), installed as `saekit.cli`. Thin: each command builds
its stage's config from flags and a --config file (`commands`) and calls the library."""

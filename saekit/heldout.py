"""Which rows of a store an SAE never saw: the one held-out rule for train, eval and pursue.

`saekit train` trains on the rows before the store's last `eval_rows` rows and evaluates on those
last rows; they also stay out of its normalization statistics. A stage that measures an SAE on
unseen rows takes the same rows: the count a training run recorded in its config.json when the SAE
is given as a run directory, else the default rule below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from saekit.errors import SaekitError

DEFAULT_HELD_OUT = 65536
"""At most this many rows are held out by default (a tenth of the store below that)."""


def held_out_rows(n_rows: int, eval_rows: int = 0) -> range:
    """The held-out rows of an `n_rows`-row store: its last `eval_rows` rows, or by default its last
    min(65536, n_rows // 10). The range starts below 0 when eval_rows > n_rows (callers refuse that)."""
    count = eval_rows or min(DEFAULT_HELD_OUT, n_rows // 10)
    return range(n_rows - count, n_rows)


def run_eval_rows(sae_spec: str | os.PathLike) -> int | None:
    """The held-out row count a `saekit train` run recorded, when `sae_spec` is its run directory (or
    that directory's sae/); None for any other SAE (a saekit or sae-lens SAE dir, a hub id)."""
    path = Path(os.fspath(sae_spec)).expanduser()
    run = path if (path / "sae").is_dir() else path.parent if path.name == "sae" else None
    config = run / "config.json" if run is not None else None
    if config is None or not config.is_file():
        return None
    try:
        saved = json.loads(config.read_bytes())
    except (OSError, ValueError):
        saved = None
    rows = saved.get("eval_rows") if isinstance(saved, dict) else None
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        raise SaekitError(
            f"run config {config} is damaged (no positive eval_rows): restore it from a copy, or pass --sequences to choose the rows"
        )
    return rows

"""Which rows of a store an SAE never saw: the one held-out rule for train, eval and pursue.

`saekit train` trains on the rows before the store's last `eval_rows` rows and evaluates on those
last rows; they also stay out of its normalization statistics. A stage that measures an SAE on
unseen rows takes the same rows (`sae_held_out`): the count a training run recorded in its
config.json when the SAE is given as a run directory, else the default rule below.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from saekit.errors import SaekitError
from saekit.sae import run_config_file

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
    config = run_config_file(sae_spec)
    if config is None:
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


class HeldOut(NamedTuple):
    """The rows of a store an SAE never saw, as far as saekit can tell (`sae_held_out`)."""

    rows: range
    """The held-out rows: the store's last ones."""
    trained_here: bool
    """The SAE records training on this store (its metadata's store_hash). If not, `rows` are the
    default rule's, and whether the SAE saw any row of the store is unknown."""
    from_run: bool
    """The count is the one the SAE's training run recorded (its config.json's eval_rows), not the default rule."""

    def describe(self, compared: range) -> str:
        """For a report's header: whether the `compared` rows are held out ('yes: ...', 'no: ...' or
        'unknown: ...'), and by which rule."""
        n, start = len(self.rows), self.rows.start
        if not self.trained_here:
            where = "inside" if compared.start >= start else "not inside"
            return (
                f"unknown: the SAE does not record training on this store; these rows are {where} "
                f"its last {n}, which `saekit train` holds out by default"
            )
        if compared.start >= start:
            rule = "its training run held out" if self.from_run else "`saekit train` holds out by default"
            return f"yes: inside the store's last {n} rows, which {rule} (the SAE never saw them)"
        seen = min(compared.stop, start) - compared.start
        return f"no: {seen} of these rows trained the SAE (it never saw only rows {start}..{self.rows.stop - 1})"


def sae_held_out(store: Any, sae: Any, sae_spec: str | os.PathLike) -> HeldOut:
    """The held-out rows of `store` for `sae` (given as `sae_spec`): its run's own count when the
    spec is a run dir trained on this store, else the default rule."""
    trained_here = isinstance(sae.metadata, dict) and sae.metadata.get("store_hash") == store.content_hash
    eval_rows = run_eval_rows(sae_spec) if trained_here else None
    return HeldOut(held_out_rows(store.n_rows, eval_rows or 0), trained_here, eval_rows is not None)

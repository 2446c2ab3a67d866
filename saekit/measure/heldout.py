"""Which rows of a store an SAE never saw: the one held-out rule for train, eval and pursue.

`saekit train` trains on the rows before the store's last `eval_rows` rows and evaluates on those
last rows; they also stay out of its normalization statistics. Every training stage records the
rows it trained on in the SAE's own metadata (`TRAINED_ON`: the store's content hash, the hook and
the row range), after the records of the SAE it started from (`--from-pretrained`). So the record
travels with the SAE: a copy of its sae/ directory, its sae-lens export, an SAE trained from it.

A stage that measures an SAE on unseen rows takes the rows after every recorded range on this
store (`sae_held_out`). Without a record on this store it takes the default rule below and says
that whether the SAE saw them is unknown; where the SAE started from one whose training saekit
cannot see (a sae-lens SAE), it says that too, rather than "the SAE never saw them".
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from saekit.atomic import read_regular
from saekit.errors import SaekitError
from saekit.reports import run_config_file

DEFAULT_HELD_OUT = 65536
"""At most this many rows are held out by default (a tenth of the store below that)."""
TRAINED_ON = "trained_on"
"""SAE metadata key: the training stages behind the SAE, oldest first. Each is a dict: a saekit
stage's {"store_hash", "hook", "rows": [start, stop]}, or {"sae": spec, "rows": None} for an SAE
whose training saekit cannot see (where a stage started from it)."""


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
        saved = json.loads(read_regular(config))
    except (OSError, ValueError):
        saved = None
    rows = saved.get("eval_rows") if isinstance(saved, dict) else None
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        raise SaekitError(
            f"run config {config} is damaged (no positive eval_rows): restore it from a copy, or pass --sequences to choose the rows"
        )
    return rows


def _valid(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    rows = record.get("rows")
    if rows is None:
        return True
    return (
        isinstance(record.get("store_hash"), str)
        and isinstance(rows, list)
        and len(rows) == 2
        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows)
    )


def training_records(sae: Any, sae_spec: str | os.PathLike, store: Any) -> list[dict]:
    """The training stages behind `sae` (given as `sae_spec`), oldest first (`TRAINED_ON`).

    An SAE saved before saekit kept the record: a run dir's own held-out count rebuilds it on
    `store` when the SAE says it was trained there (its metadata's store_hash); otherwise its
    rows are unknown. An SAE with no record at all is one saekit cannot see the training of.
    """
    meta = sae.metadata if isinstance(sae.metadata, dict) else {}
    records = meta.get(TRAINED_ON)
    if isinstance(records, list) and records and all(map(_valid, records)):
        return records
    spec = os.fspath(sae_spec)
    if isinstance(meta.get("store_hash"), str):  # a saekit SAE from before the record
        eval_rows = run_eval_rows(sae_spec) if meta["store_hash"] == store.content_hash else None
        rows = [0, store.n_rows - eval_rows] if eval_rows else None
        return [{"store_hash": meta["store_hash"], "hook": meta.get("hook_name"), "rows": rows, "sae": spec}]
    return [{"sae": spec, "rows": None}]


def training_record(
    store: Any, hook: str, stop: int, pretrained: Any = None, pretrained_spec: str | os.PathLike = ""
) -> list[dict]:
    """What an SAE trained on rows [0, stop) of `store`'s `hook` records (`TRAINED_ON`): the records
    of the SAE it started from (--from-pretrained), then this stage's."""
    before = training_records(pretrained, pretrained_spec, store) if pretrained is not None else []
    return [*before, {"store_hash": store.content_hash, "hook": hook, "rows": [0, stop]}]


class HeldOut(NamedTuple):
    """The rows of a store an SAE never saw, as far as saekit can tell (`sae_held_out`)."""

    rows: range
    """The held-out rows: the store's last ones."""
    trained_here: bool
    """The SAE's record says which rows of this store trained it; if not, `rows` are the default
    rule's, and whether the SAE saw any row of the store is unknown."""
    unseen: str
    """'' when saekit knows all of the SAE's training; else what it cannot see (e.g. the sae-lens
    SAE a stage started from), so the rows are held out from what saekit trained only."""

    def describe(self, compared: range) -> str:
        """For a report's header: whether the `compared` rows are held out ('yes: ...', 'no: ...' or
        'unknown: ...'), and by which rule."""
        n, start = len(self.rows), self.rows.start
        if not self.trained_here:
            where = "inside" if compared.start >= start else "not inside"
            why = f"{self.unseen}" if self.unseen else "the SAE does not record which rows of this store trained it"
            return f"unknown: {why}; these rows are {where} its last {n}, which `saekit train` holds out by default"
        if compared.start >= start:
            if self.unseen:
                return (
                    f"yes: inside the store's last {n} rows, which saekit's training held out; but {self.unseen}, "
                    "so whether they trained it before is unknown"
                )
            return f"yes: inside the store's last {n} rows, which its training held out (the SAE never saw them)"
        seen = min(compared.stop, start) - compared.start
        return f"no: {seen} of these rows trained the SAE (it never saw only rows {start}..{self.rows.stop - 1})"


def sae_held_out(store: Any, sae: Any, sae_spec: str | os.PathLike) -> HeldOut:
    """The held-out rows of `store` for `sae` (given as `sae_spec`): the rows after every range its
    record says trained it on this store, else the default rule."""
    records = training_records(sae, sae_spec, store)
    unknown = [r for r in records if r.get("rows") is None]
    unseen = ""
    if unknown:
        what = unknown[0].get("sae") or "an SAE"
        here = unknown[0].get("store_hash") == store.content_hash
        unseen = (
            f"{what} was trained on this store before saekit recorded which rows"
            if here
            else f"saekit does not know what {what} was trained on"
        )
    mine = [r for r in records if r.get("store_hash") == store.content_hash and r.get("rows") is not None]
    if not mine:
        return HeldOut(held_out_rows(store.n_rows), False, unseen)
    start = max(r["rows"][1] for r in mine)
    return HeldOut(range(min(start, store.n_rows), store.n_rows), True, unseen)

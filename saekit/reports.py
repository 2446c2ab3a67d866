"""The one report writer, and what reports say about an SAE beyond their numbers.

`Report(...).write(out)` writes a stage's report.json, report.md and plot (each replaced
atomically), the same way for pursue and eval: a header, a paragraph, a table built from
`Column`s over the entries (any `ReportEntry`: a method, its k, its source), extra sections (the gap
decomposition), the plot against L0. A new metric is one `Column`; a new report, one `Report`.
Beside it: whether an SAE's encoder is stale (trained against another dictionary), the row labels
and the note that say so, and the run dir an SAE came from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from saekit.atomic import read_regular, write_atomic
from saekit.plots import Ys, plot_against_l0
from saekit.sae.files import ENCODER_STALE

if TYPE_CHECKING:  # annotations only
    from saekit.sae import SparseAutoencoder


REPORT_JSON, REPORT_MD = "report.json", "report.md"


class ReportEntry(Protocol):
    """What the writer reads from every entry of a report (pursue's `Entry`, eval's `EvalEntry`)."""

    @property
    def method(self) -> str: ...
    @property
    def k(self) -> float | None: ...
    @property
    def source(self) -> str: ...


class Column(NamedTuple):
    """One column of a report's table: its title and each entry's cell."""

    title: str
    cell: Callable[[Any], str]
    align: str = "---:"  # markdown: right-aligned numbers; "---" for names


def fmt(v: float | None, spec: str) -> str:
    """A number in a table cell: '' for None or NaN; a tiny ΔCE in e-notation, never 0.0000."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if spec.endswith("4f") and v and abs(v) < 5e-4:  # e.g. the cache round-trip's ΔCE
        return format(v, spec[:-2] + "1e")
    return format(v, spec)


def markdown_table(columns: Sequence[Column], entries: Sequence[Any]) -> str:
    """The entries as a markdown table, one row each."""
    lines = [
        "| " + " | ".join(c.title for c in columns) + " |",
        "|" + "|".join(c.align for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(c.cell(e) for c in columns) + " |" for e in entries]
    return "\n".join(lines)


@dataclass
class Plot:
    """The report's plot against L0 (`saekit.plots.plot_against_l0`): one panel per y label."""

    name: str
    """Its file name in the output directory."""
    caption: str
    """Its alt text in report.md."""
    ylabels: Sequence[str]
    curves: Mapping[str, Sequence[tuple[float, Ys]]]
    points: Mapping[str, tuple[float, Ys]]
    levels: Mapping[str, Ys] | None = None
    title: str = ""


@dataclass
class Report:
    """One stage's report: `write(out)` puts report.json, report.md and the plot in `out`."""

    stage: str
    """'pursue' or 'eval': report.md's title."""
    header: dict
    """What was measured: one '- key: `value`' line each in report.md."""
    about: str
    """The paragraph under the header: how to read the numbers."""
    table: str
    """The entries' table (`markdown_table`)."""
    doc: Any
    """report.json's content."""
    plot: Plot
    sections: list[str] = field(default_factory=list)
    """More markdown after the table (the gap decomposition)."""

    def write(self, out: Path) -> str:
        """Writes the three files, each replaced atomically; returns the table and its sections."""
        write_atomic(out / REPORT_JSON, json.dumps(self.doc, indent=1))
        table = "\n\n".join([self.table, *self.sections])
        head = "\n".join(f"- {k}: `{v}`" for k, v in self.header.items())
        md = f"# saekit {self.stage} report\n\n{head}\n\n{self.about}\n\n{table}\n\n![{self.plot.caption}]({self.plot.name})\n"
        write_atomic(out / REPORT_MD, md)
        p = self.plot
        plot_against_l0(out / p.name, p.ylabels, p.curves, p.points, p.levels, title=p.title)
        return table


STALE = " (stale)"
"""What a report appends to the name of such an encoder's row."""
_STALE_NOTE = (
    "not trained with its SAE's current dictionary (`saekit train --codes pursuit` trains only the dictionary): "
    "the row measures a leftover encoder, not an encoder for this dictionary."
)


def encoder_stale(sae: SparseAutoencoder, spec: str | os.PathLike) -> bool:
    """Whether `sae`'s encoder was not trained with its current dictionary: its metadata says so
    (`saekit train` records it), or `spec` is a run dir trained with `--codes pursuit` before it did."""
    if isinstance(sae.metadata, dict) and sae.metadata.get(ENCODER_STALE) is True:
        return True
    config = run_config_file(spec)
    try:
        saved = json.loads(read_regular(config)) if config is not None else None
    except (OSError, ValueError):  # a damaged run config says nothing about the encoder
        saved = None
    return isinstance(saved, dict) and saved.get("codes") == "pursuit"


def encoder_label(name: str, sae: SparseAutoencoder, spec: str | os.PathLike) -> str:
    """A report's name for the row of `sae`'s encoder: `name`, marked STALE when `encoder_stale`."""
    return name + (STALE if encoder_stale(sae, spec) else "")


def stale_note(methods: list[str]) -> str:
    """A report's sentence on its rows marked STALE; '' when there are none."""
    stale = [m for m in methods if m.endswith(STALE)]
    return f"{', '.join(f'`{m}`' for m in stale)}: {_STALE_NOTE}" if stale else ""


def run_config_file(spec: str | os.PathLike) -> Path | None:
    """The training config.json of the `saekit train` run dir that `spec` names (the run dir or
    its sae/); None for any other SAE (a saekit or sae-lens SAE dir, a hub id)."""
    path = Path(os.fspath(spec)).expanduser()
    run = path if (path / "sae").is_dir() else path.parent if path.name == "sae" else None
    config = run / "config.json" if run is not None else None  # the training config, beside sae/
    return config if config is not None and config.is_file() else None

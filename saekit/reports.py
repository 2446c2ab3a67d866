"""What pursue's and eval's reports say about an SAE beyond their numbers: whether its encoder is
stale (trained against another dictionary), the row labels and the note that say so, and the run
dir an SAE came from."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from saekit.atomic import read_regular
from saekit.sae_files import ENCODER_STALE

if TYPE_CHECKING:  # annotations only
    from saekit.sae import SparseAutoencoder


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

"""The files of an SAE directory, shared by saekit's own format (`saekit.sae`) and the sae-lens
conversions (`saekit.sae.lens_io`): their names, the metadata key of a stale encoder, reading a JSON
object, and publishing a directory whole."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from saekit.atomic import discard_leftovers, read_regular, replace_dir
from saekit.errors import SaekitError, is_non_empty

SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SAE_LENS_CONFIG = "cfg.json"
ENCODER_STALE = "encoder_stale"
"""Metadata key, True when the SAE's encoder was not trained with its current dictionary:
`saekit train --codes pursuit` trains only the dictionary and leaves the encoder as it was."""


def publish_dir(path: Path, write: Any, overwrite: bool) -> None:
    """Write a directory aside with `write(tmp)` and swap it into place (`atomic.replace_dir`):
    `path` is the old directory or the new one, never half of one; what an interrupted publish
    left beside it goes first."""
    if is_non_empty(path) and not overwrite:
        raise SaekitError(f"{path} already exists and is not empty: choose a new path or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    discard_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and not path.is_dir():
        path.unlink()
    replace_dir(tmp, path)


def read_json_object(file: Path, what: str) -> dict:
    """The JSON object in `file`; anything else is one SaekitError line naming the file."""
    try:
        raw = json.loads(read_regular(file))
    except json.JSONDecodeError as e:
        raise SaekitError(f"{file} is not valid JSON ({e.msg}, line {e.lineno}): re-save the SAE") from None
    except ValueError:  # bytes that are not text at all
        raise SaekitError(f"{file} is not valid JSON (it is not text): re-save the SAE") from None
    except OSError as e:
        raise SaekitError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise SaekitError(f"{file} is not {what} (a JSON object is expected): re-save the SAE")
    return raw

"""Device resolution, once for every stage: every command accepts the same --device values and
gives the same one-line error for any other."""

from __future__ import annotations

import re

import torch

from saekit.errors import SaekitError

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N'. Anything else (tpu, gpu,
    mps, a typo) and CUDA without a GPU are one-line errors, before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if m is None:
        raise SaekitError(f"unknown --device {device!r}: use {DEVICES}")
    if not torch.cuda.is_available():
        raise SaekitError(f"--device {device} but no CUDA GPU is visible: use --device cpu or --device auto")
    n = torch.cuda.device_count()
    if m[1] is not None and int(m[1]) >= n:
        raise SaekitError(f"--device {device} but only {n} CUDA GPU(s) are visible: use cuda:0 to cuda:{n - 1}")
    return torch.device(device)

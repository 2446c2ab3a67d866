"""A training run's resumable state: checkpoint/ (safetensors for tensors, JSON for the rest;
nothing is pickled) and metrics.jsonl, which a resumed run trims back to its checkpoint.

`saekit.train` writes both; a checkpoint restores the weights, Adam's state, the firing tracker,
the RNG and the data `Position`, so a resumed run on the CPU is bitwise the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.atomic import aside, discard_dir, read_regular, replace_dir, write_atomic
from saekit.config import check_types
from saekit.errors import SaekitError, one_line
from saekit.metrics import FiringTracker
from saekit.sae import SparseAutoencoder


class Position(NamedTuple):
    """Where training stands: optimizer steps taken, and the next batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

CKPT = "checkpoint"
MARKER = "state.json"  # written last, deleted first: a checkpoint directory holding it is complete


def save_checkpoint(
    out: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, firing: FiringTracker, pos: Position
) -> None:
    """Write out/checkpoint/ aside and swap it in (`atomic.replace_dir`): a kill between any two
    filesystem operations leaves a complete checkpoint, the previous one or this one, that
    `checkpoint_dir` finds; what such a kill left aside goes at the next save."""
    tmp, final = out / f"{CKPT}.tmp", out / CKPT
    discard_dir(tmp, MARKER)
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, sae, opt, firing, pos)
    except BaseException:
        discard_dir(tmp, MARKER)  # give back the space a failed write took (disk full)
        raise
    replace_dir(tmp, final, MARKER)


def _write_checkpoint(
    tmp: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, firing: FiringTracker, pos: Position
) -> None:
    from safetensors.torch import save_file  # lazy: only reading or writing weights needs it

    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp / "model.safetensors"))
    names: dict[Any, str] = {p: n for n, p in sae.named_parameters()}
    opt_state = {
        f"{names[p]}/{key}": v.detach().contiguous().cpu() for p, s in opt.state.items() for key, v in s.items()
    }
    save_file(opt_state, str(tmp / "optimizer.safetensors"))
    fs = firing.state_dict()
    state = {"firing/" + k: v.contiguous().cpu() for k, v in fs.items() if isinstance(v, Tensor)}
    state["rng/cpu"] = torch.get_rng_state()
    if sae.device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(sae.device)
    save_file(state, str(tmp / "state.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    meta = {"position": pos._asdict(), "param_groups": groups, "firing_window_tokens": fs["window_tokens"]}
    (tmp / MARKER).write_text(json.dumps(meta, indent=1))  # last: its presence says "complete"


def checkpoint_dir(out: Path) -> Path | None:
    """The newest complete checkpoint in a run dir (the one a swap without an atomic exchange
    had put aside, if a kill came before the new one was in place)."""
    for ckpt in (out / CKPT, aside(out / CKPT)):
        if (ckpt / MARKER).is_file():
            return ckpt
    return None


def load_checkpoint(ckpt: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, firing: FiringTracker) -> Position:
    """Restore weights, optimizer, firing tracker and RNG from `ckpt`; returns the data position.

    A damaged checkpoint is one line before anything is restored."""
    from safetensors.torch import load_file  # lazy: only reading or writing weights needs it

    device = sae.device
    try:
        meta = json.loads(read_regular(ckpt / "state.json"))
        model = load_file(str(ckpt / "model.safetensors"), device=str(device))
        opt_flat = load_file(str(ckpt / "optimizer.safetensors"), device=str(device))
        state = load_file(str(ckpt / "state.safetensors"))
    except Exception as e:
        raise SaekitError(
            f"checkpoint {ckpt} is unreadable ({type(e).__name__}); delete it to restart, or restore it"
        ) from None
    groups = opt.state_dict()["param_groups"]
    meta = _checked_meta(meta, ckpt, groups)
    index = {n: i for i, (n, p) in enumerate((n, p) for n, p in sae.named_parameters() if p.requires_grad)}
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, v in opt_flat.items():
        name, _, field = key.rpartition("/")
        if name not in index:
            raise SaekitError(f"checkpoint {ckpt} trains {name} but this run does not: resume with the same flags")
        per_param.setdefault(index[name], {})[field] = v
    for g, saved in zip(groups, meta["param_groups"]):
        g.update({k: v for k, v in saved.items() if k in g})
    try:
        sae.load_state_dict(model)
        opt.load_state_dict({"state": per_param, "param_groups": groups})
        firing.load_state_dict(
            {
                "tokens_since_fired": state["firing/tokens_since_fired"],
                "fire_counts": state["firing/fire_counts"],
                "window_tokens": meta["firing_window_tokens"],
                "last_density": state.get("firing/last_density"),
            }
        )
        torch.set_rng_state(state["rng/cpu"])
        if "rng/cuda" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng/cuda"], device)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise SaekitError(
            f"checkpoint {ckpt} does not fit this run ({type(e).__name__}: {one_line(e, 120)}); delete it to restart, or restore it"
        ) from None
    return Position(**meta["position"])


class _CheckpointMeta(NamedTuple):
    """What state.json of a checkpoint holds."""

    position: dict  # Position's fields
    param_groups: list[dict]  # Adam's hyper-parameters, one dict per group
    firing_window_tokens: int


def _checked_meta(meta: Any, ckpt: Path, groups: list[dict]) -> dict[str, Any]:
    """state.json as `save_checkpoint` writes it (position reduced to Position's fields), or one
    line naming what is wrong."""

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise SaekitError(f"checkpoint {ckpt} is damaged (state.json: {why}); delete it to restart, or restore it")

    need(isinstance(meta, dict), "not a JSON object")
    missing = [k for k in _CheckpointMeta._fields if k not in meta]
    need(not missing, f"no {', '.join(missing)}")
    try:
        meta = check_types(_CheckpointMeta, meta, "state.json")
        pos = check_types(Position, meta["position"], "state.json position")
    except SaekitError as e:
        raise SaekitError(f"checkpoint {ckpt} is damaged ({e}); delete it to restart, or restore it") from None
    need(
        all(k in pos and pos[k] >= 0 for k in Position._fields),
        f"position needs {', '.join(Position._fields)} >= 0, has {pos}",
    )
    need(
        len(meta["param_groups"]) == len(groups),
        f"{len(meta['param_groups'])} optimizer param groups, this run has {len(groups)}",
    )
    for g, saved in zip(groups, meta["param_groups"]):
        for k, v in saved.items():
            need(k not in g or _same_kind(v, g[k]), f"param_groups {k} is {v!r}")
    return meta | {"position": {k: pos[k] for k in Position._fields}}


def _same_kind(saved: Any, current: Any) -> bool:
    """A saved optimizer hyper-parameter can replace the current one (JSON turns tuples into lists)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if number(current):
        return number(saved)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current) and all(map(_same_kind, saved, current))
    return type(saved) is type(current)


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl in the run dir, mirrored to wandb (rank 0 only). One JSON object per line."""

    def __init__(self, out: Path, wandb_run: Any, main: bool, keep_until: int):
        self.path = out / "metrics.jsonl"
        self.main = main
        self.wandb = wandb_run
        if main and self.path.exists():
            # Resuming: drop lines past the checkpoint, so the file reads as one uninterrupted run.
            lines = _lines_until(self.path, keep_until)
            write_atomic(self.path, "".join(ln + "\n" for ln in lines))

    def log(self, step: int, tokens: int, data: dict[str, float]) -> None:
        if not self.main:
            return
        record = {"step": step, "tokens": tokens, **{k: _num(v) for k, v in data.items()}}
        _append_whole(self.path, json.dumps(record) + "\n")
        self.wandb.log(data, step=step)


def _lines_until(path: Path, step: int) -> list[str]:
    """The lines of metrics.jsonl up to `step`; a torn last line (a crash mid-write) is dropped."""
    # metrics.jsonl is ASCII JSON: a byte that is not UTF-8 only makes its line unparsable (damaged)
    lines = [ln for ln in read_regular(path).decode(errors="replace").splitlines() if ln]
    kept = []
    for i, ln in enumerate(lines):
        try:
            line_step = json.loads(ln)["step"]
            ok = isinstance(line_step, int)
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok and i == len(lines) - 1:
            break
        if not ok:
            raise SaekitError(
                f"--resume: {path} line {i + 1} is damaged; delete that line (or restore the file) and rerun"
            )
        if line_step <= step:
            kept.append(ln)
    return kept


def _append_whole(path: Path, text: str) -> None:
    """Append `text` whole or not at all: a line torn by a full disk is cut off again."""
    with open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        data = memoryview(text.encode())
        try:
            while data:
                data = data[f.write(data) :]
        except OSError:
            f.truncate(start)
            raise


def _num(v: Any) -> Any:
    v = float(v)
    return v if math.isfinite(v) else str(v)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(ln) for ln in read_regular(Path(run_dir) / "metrics.jsonl").decode().splitlines() if ln]

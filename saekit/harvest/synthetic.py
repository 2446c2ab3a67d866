"""Synthetic activations with ground truth: sae-lens's `SyntheticModel` as a harvest source.

`saekit harvest --model synthetic:PRESET` (or `synthetic:CONFIG.json`, a sae-lens
`SyntheticModelConfig` as JSON) writes a normal store whose rows are the model's hidden
activations, and keeps the truth beside them: the true feature directions and each row's true
sparse code. Presets:

    cpu                 SynthSAEBench's structure at a size two CPU cores study in minutes: 4,096
                        features in 256 dims, Zipfian firing (exponent 0.5, p 0.4 .. 5e-4),
                        hierarchy (32 roots, branching 4, depth 3, children mutually exclusive),
                        low-rank correlation (rank 25, scale 0.1), magnitudes 5 -> 4 with folded-
                        normal spread; about 16 active features per row
    synthsaebench-16k   the published SynthSAEBench-16k configuration (16,384 features in 768
                        dims, about 34 active per row), for GPU users

Rows are drawn shard by shard from a seed made of the model's seed and the shard's index, so a
resumed or multi-rank harvest writes the same bytes, and `--seed` gives another draw (another
dictionary and other rows) of the same configuration.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Any

import torch

from saekit.atomic import read_regular
from saekit.errors import SaekitError, one_line
from saekit.pursuit import SparseCodes

PREFIX = "synthetic:"
HOOK = "hidden"
"""The one hook of a synthetic store: the model's hidden activations."""

_SSB = {  # SynthSAEBench's structure (sae-lens docs/synthsaebench.md), in SyntheticModelConfig.to_dict form
    "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4},
    "orthogonalization": {"num_steps": 100, "lr": 3e-4, "chunk_size": 1024},
    "correlation": {"rank": 25, "correlation_scale": 0.1, "seed": None},
    "mean_firing_magnitudes": {"generator_name": "linear", "start": 5.0, "end": 4.0},
    "std_firing_magnitudes": {
        "generator_name": "folded_normal",
        "mean": 0.5,
        "std": 0.5,
        "min_value": None,
        "max_value": None,
    },
    "bias": 1.0,
    "dtype": "float32",
    "seed": 42,
}


def _hierarchy(roots: int) -> dict:
    return {
        "total_root_nodes": roots,
        "branching_factor": 4,
        "max_depth": 3,
        "mutually_exclusive_portion": 1.0,
        "mutually_exclusive_min_depth": 0,
        "mutually_exclusive_max_depth": None,
        "compensate_probabilities": True,
        "scale_children_by_parent": True,
    }


PRESETS: dict[str, dict] = {
    "cpu": {"num_features": 4096, "hidden_dim": 256, **_SSB, "hierarchy": _hierarchy(32)},
    "synthsaebench-16k": {"num_features": 16384, "hidden_dim": 768, **_SSB, "hierarchy": _hierarchy(128)},
}


def is_synthetic(model: str | None) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def synthetic_config(model: str, seed: int | None = None) -> dict:
    """The sae-lens `SyntheticModelConfig` (as a dict) that `synthetic:PRESET` or
    `synthetic:CONFIG.json` names, with `seed` in place of its own; one line for anything wrong."""
    name = model[len(PREFIX) :]
    if name in PRESETS:
        d = json.loads(json.dumps(PRESETS[name]))
    elif name.endswith(".json"):
        d = _read_config(name)
    else:
        raise SaekitError(
            f"--model {model}: no synthetic preset {name!r}; use synthetic:{' or synthetic:'.join(PRESETS)}, "
            "or synthetic:CONFIG.json (a sae-lens SyntheticModelConfig)"
        )
    if seed is not None:
        d["seed"] = seed
    if d.get("seed") is None:
        d["seed"] = 0
    _check(d, model)
    return d


def _read_config(path: str) -> dict:
    try:
        d = json.loads(read_regular(path))
    except FileNotFoundError:
        raise SaekitError(
            f"--model synthetic:{path}: no such file; pass a sae-lens SyntheticModelConfig saved as JSON"
        ) from None
    except (OSError, ValueError) as e:
        raise SaekitError(
            f"--model synthetic:{path}: not readable JSON ({one_line(str(e))[:120]}); fix the file"
        ) from None
    if not isinstance(d, dict):
        raise SaekitError(f"--model synthetic:{path}: holds {type(d).__name__}, not a SyntheticModelConfig's fields")
    return d


def _check(d: dict, model: str) -> None:
    """The config builds a sae-lens `SyntheticModelConfig` of sane size, or one line says what is wrong."""
    cfg = _sae_lens_config(d, model)
    seed = d.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise SaekitError(f"--model {model}: seed {d.get('seed')!r} is not an integer in [0, 2^32)")
    if cfg.num_features > 2**20 or cfg.hidden_dim > 2**16:
        raise SaekitError(
            f"--model {model}: {cfg.num_features} features in {cfg.hidden_dim} dims is more than saekit stores"
        )


def _sae_lens_config(d: dict, model: str) -> Any:
    # lazy: sae-lens takes seconds to import; only synthetic harvests need it
    from sae_lens.synthetic import SyntheticModelConfig

    try:
        return SyntheticModelConfig.from_dict(d)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SaekitError(
            f"--model {model}: not a valid sae-lens SyntheticModelConfig ({one_line(f'{type(e).__name__}: {e}')[:160]}); "
            "see sae_lens.synthetic.SyntheticModelConfig for its fields"
        ) from None


class SyntheticSource:
    """A built synthetic model: its true features, and rows drawn shard by shard."""

    def __init__(self, config: dict, model: str = "synthetic"):
        # lazy: as _sae_lens_config
        from sae_lens.synthetic import SyntheticModel

        self.config = config
        cfg = _sae_lens_config(config, model)
        with _quiet():  # sae-lens's own progress bars (orthogonalization) would bury saekit's
            self.model = SyntheticModel(cfg)
        self.seed: int = config["seed"]
        self.d_model: int = cfg.hidden_dim
        self.n_features: int = cfg.num_features

    @property
    def features(self) -> torch.Tensor:
        """[n_features, d_model] float32: the true feature directions (unit rows)."""
        return self.model.feature_dict.feature_vectors.detach().float().cpu().contiguous()

    @property
    def bias(self) -> torch.Tensor:
        """[d_model] float32: what every row adds to its features (the dictionary's bias)."""
        return self.model.feature_dict.bias.detach().float().cpu().contiguous()

    def draw(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard `index`'s n rows: (x [n, d_model] float32, true feature activations [n, n_features])."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stream_seed(self.seed, index))
            x, feats = self.model.sample_with_features(n)
        return x.float().cpu(), feats.float().cpu()

    def truth_width(self) -> int:
        """The slots each row's true code gets: 1.5x the most active features of 8,192 rows drawn
        apart from the store's, rounded up to a multiple of 8 (a row with more is an error)."""
        _, feats = self.draw(-1, 8192)
        most = int((feats > 0).sum(1).max())
        return max(8, 8 * math.ceil(1.5 * most / 8))


def true_codes(feats: torch.Tensor, width: int, first_row: int = 0) -> SparseCodes:
    """Rows' true feature activations [n, n_features] as codes [n, width] (active features first,
    by index; free slots hold index 0 and value 0)."""
    active = feats > 0
    most = int(active.sum(1).max()) if feats.shape[0] else 0
    if most > width:
        row = first_row + int(active.sum(1).argmax())
        raise SaekitError(
            f"row {row} has {most} active true features, more than the store's {width} truth slots; "
            "harvest again with a new --out (the width is chosen from the model's first rows)"
        )
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :width]
    values = feats.gather(1, order) * active.gather(1, order)
    indices = torch.where(values > 0, order, 0)
    return SparseCodes(indices.to(torch.int32), values.float())


def _stream_seed(seed: int, index: int) -> int:
    """The torch seed of shard `index`'s rows (index -1: the width calibration), apart from the
    seeds sae-lens derives from `seed` (seed .. seed + 4) for the model itself."""
    return (seed * 1_000_003 + (index + 2) * 7_919 + 12_345) % (2**63)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        old = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old

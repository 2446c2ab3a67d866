"""Stage 2, train: SAEs, MLP encoders and dictionaries from a memory-mapped store.

stage.py       run: build the SAE, the loop, held-out evaluation, the run directory
config.py      TrainConfig and resolve ("0 means auto" filled once)
loss.py        the loss of a batch (Matryoshka prefixes included)
jumprelu.py    JumpReLU training: straight-through estimators and sparsity losses
checkpoint.py  the resumable state
"""

from saekit.train.config import TrainConfig
from saekit.train.stage import (
    RunResult,
    batches,
    build_sae,
    read_run_config,
    run,
    train_step,
)

__all__ = [
    "TrainConfig",
    "RunResult",
    "batches",
    "build_sae",
    "read_run_config",
    "run",
    "train_step",
]

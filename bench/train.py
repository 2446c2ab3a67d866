"""Benchmark saekit's training step against sae-lens's, and the cache's data path against RAM.

    .venv/bin/python bench/train.py                       # d 768, 6144 latents, k 32, batch 2048
    .venv/bin/python bench/train.py --d-in 256 --n-features 2048 --steps 5    # quick
    .venv/bin/python bench/train.py --device cuda

Prints tokens/s and two ratios, each against a baseline measured in the same run:

1. step: saekit's `train_step` (TopK SAE, AuxK, decoder-norm constraint, Adam, dead-latent
   tracking) / sae-lens's `TopKTrainingSAE` step as its own trainer runs it (training_forward_pass,
   backward, clip_grad_norm_, Adam, firing bookkeeping), same shapes, same batches from RAM. Target >= 1.0.
   `--arch matryoshka` (Batch-TopK, groups n/8, n/4, rest) and `--arch jumprelu` (quadratic
   sparsity loss at L0 k) compare against sae-lens's MatryoshkaBatchTopKTrainingSAE and
   JumpReLUTrainingSAE the same way.
2. data: saekit's step fed by the trainer's own shuffled reader from a store on disk / fed by
   slices of an in-memory tensor. Target >= 0.9.

The configurations are interleaved over --rounds rounds and the median round is reported, so a
noisy shared machine affects both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from saekit import train
from saekit.metrics import FiringTracker
from saekit.sae import SparseAutoencoder
from saekit.store import create_store, open_store
from saekit.train import loss as train_loss
from saekit.train.checkpoint import Position
from saekit.train.config import matryoshka_prefixes
from saekit.train.jumprelu import JumpReLUTraining

HOOK = "blocks.8.hook_resid_pre"


def GROUPS(n: int) -> list[int]:
    """The Matryoshka groups of --arch matryoshka: n/8, n/4 and the rest (n=512: 64,128,320)."""
    return [n // 8, n // 4, n - n // 8 - n // 4]


def make_store(path: Path, rows: int, d: int, seed: int = 0) -> None:
    """Gaussian rows with a nonzero mean, written as a finished store."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g)
    w = create_store(path, {HOOK: d}, n_rows=rows, meta={"bench": True}, shard_rows=65536, chunk_rows=4096)
    for s in range(0, rows, 65536):
        n = min(65536, rows - s)
        w.append({HOOK: torch.randn(n, d, generator=g) + mean}, torch.zeros(n), torch.zeros(n))
    w.finalize()


class SaekitStep:
    """saekit's training step, exactly as `saekit train` runs it (one rank), for --arch."""

    def __init__(
        self, d: int, n: int, k: int, mean: torch.Tensor, msn: float, device: torch.device, arch: str = "topk"
    ):
        torch.manual_seed(0)
        activation = {"topk": "topk", "matryoshka": "batchtopk", "jumprelu": "jumprelu"}[arch]
        self.sae = (
            SparseAutoencoder(d_in=d, n_features=n, k=None if arch == "jumprelu" else k, activation=activation)
            .to(device)
            .train()
        )
        self.sae.set_input_normalization(mean, msn)
        var = train_loss.normalized_variance(self.sae, mean, msn)
        prefixes = matryoshka_prefixes(",".join(map(str, GROUPS(n)))) if arch == "matryoshka" else ()
        spec = JumpReLUTraining("quadratic", 0.05, 1.0, float(k), 4.0, 0.0, True) if arch == "jumprelu" else None
        self.model = train_loss.Objective(self.sae, "encoder", k, d // 2, 1 / 32, var, 0.0, prefixes, spec)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.firing = FiringTracker(n, window=10_000_000, device=device)

    def __call__(self, x: torch.Tensor) -> None:
        train.train_step(self.model, self.sae, self.opt, self.firing, x, 1e-4)


class SaeLensStep:
    """sae-lens's own training SAE for --arch (TopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE,
    JumpReLUTrainingSAE), stepped as sae_lens.training.sae_trainer.SAETrainer._train_step runs it."""

    def __init__(self, d: int, n: int, k: int, device: torch.device, arch: str = "topk"):
        from sae_lens.saes.sae import TrainStepInput

        torch.manual_seed(0)
        self.Input = TrainStepInput
        common = dict(d_in=d, d_sae=n, device=str(device), dtype="float32")
        if arch == "topk":
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

            self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
        elif arch == "matryoshka":
            from sae_lens.saes.matryoshka_batchtopk_sae import (
                MatryoshkaBatchTopKTrainingSAE,
                MatryoshkaBatchTopKTrainingSAEConfig,
            )

            widths = list(itertools.accumulate(GROUPS(n)))
            self.sae = MatryoshkaBatchTopKTrainingSAE(
                MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=widths, **common)
            )
        else:
            from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

            cfg = JumpReLUTrainingSAEConfig(
                jumprelu_sparsity_loss_mode="quadratic", target_l0=float(k), jumprelu_ste_to_input=True, **common
            )
            self.sae = JumpReLUTrainingSAE(cfg)
        self.coefficients = {"l0": 1.0} if arch == "jumprelu" else {}
        self.sae.train()
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.since_fired = torch.zeros(n, device=device)
        self.freq = torch.zeros(n, device=device)
        self.step = 0

    def __call__(self, x: torch.Tensor) -> None:
        dead = self.since_fired > 10_000_000 // x.shape[0]
        out = self.sae.training_forward_pass(
            step_input=self.Input(
                sae_in=x.float(),
                coefficients=self.coefficients,
                dead_neuron_mask=dead,
                n_training_steps=self.step,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
            self.freq += firing.sum(0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.step += 1


def ram_batches(x: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    while True:
        for s in range(0, x.shape[0] - batch + 1, batch):
            yield x[s : s + batch]


def tokens_per_s(
    step: Callable[[torch.Tensor], None], data: Iterator[torch.Tensor], steps: int, device: torch.device
) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 0
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        x = next(data).to(device, non_blocking=True)
        step(x)
        n += x.shape[0]
    sync()
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-features", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=131072, help="rows in the temporary store")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--arch", default="topk", choices=["topk", "matryoshka", "jumprelu"], help="the architecture of both steps"
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    with tempfile.TemporaryDirectory() as tmp:
        make_store(Path(tmp) / "store", a.rows, a.d_in)
        store = open_store(Path(tmp) / "store")
        stats = store.stats(HOOK)
        ram = store.rows(HOOK, 0, a.rows).clone()  # the same rows, in memory (bf16, as read from disk)
        ours = SaekitStep(a.d_in, a.n_features, a.k, stats.mean, stats.mean_sq_norm, device, a.arch)
        theirs = SaeLensStep(a.d_in, a.n_features, a.k, device, a.arch)
        disk = train.batches(store, HOOK, stop_row=a.rows, local_batch=a.batch, seed=0, start=Position())
        disk_x = (b.x for b in disk)
        ram_x = ram_batches(ram, a.batch)
        ram_f32 = (x.float() for x in ram_batches(ram, a.batch))
        runs = {
            "saekit step, batches from RAM": (ours, ram_x),
            f"sae-lens {type(theirs.sae).__name__} step, batches from RAM": (theirs, ram_f32),
            "saekit step, shuffled batches from the store": (ours, disk_x),
        }
        for step, data in runs.values():  # warm-up: allocations, page cache, lazy imports
            tokens_per_s(step, data, 2, device)
        results: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, (step, data) in runs.items():
                results[name].append(tokens_per_s(step, data, a.steps, device))
        disk.close()

    med = {name: statistics.median(v) for name, v in results.items()}
    print(
        f"{a.arch}; shapes: d_in {a.d_in}, n_features {a.n_features}, k {a.k}, batch {a.batch}; device {device}, "
        f"threads {torch.get_num_threads()}; {a.steps} steps x {a.rounds} rounds (median)"
    )
    for name, v in med.items():
        print(f"  {name:<50} {v:>12,.0f} tokens/s")
    names = list(med)
    print(f"step ratio  saekit / sae-lens       = {med[names[0]] / med[names[1]]:.2f}x  (target >= 1.0)")
    print(f"data ratio  store / in-memory       = {med[names[2]] / med[names[0]]:.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()

"""`TrainConfig` + `run(cfg)`: train SAEs, encoders and dictionaries from the activation cache.

One loop, three things it can train, each set by a small part:

- a new TopK / Batch-TopK SAE (`build_sae` from sizes; encoder and decoder train);
- a new encoder, linear or MLP, optionally followed by learned refinement steps (`--unroll`),
  against a frozen dictionary (`--from-pretrained`; optionally starting from that SAE's encoder,
  the skip-connection init), optionally distilled toward gradient pursuit's codes (`--distill`,
  the codes computed each step or read from a `saekit pursue` codes store, `--distill-codes`);
- the dictionary itself under nonlinear codes (`--codes pursuit|both`, or an MLP encoder with the
  decoder training): `Objective` (in `saekit.train.loss`) decides where the codes come from — the
  encoder (MSE + AuxK), gradient pursuit against the current dictionary (codes without grad, MSE
  step on the decoder), or both.

Shared by all: shuffled batches from the store, Adam with linear warm-up and decay, unit-norm
decoder rows, dead-latent tracking, held-out evaluation, checkpoints that resume bit for bit on
the CPU (`saekit.train.checkpoint`), and DDP under torchrun. The language model is never loaded: the store is memory-mapped.

Losses are in the dictionary's normalized space and divided by the training rows' total variance
there, so `train/fvu` reads as a fraction of variance unexplained whatever the activations' scale.
The held-out rows (the store's last `eval_rows`) shape nothing: the normalization statistics leave
them out, and the evaluation on them reports raw-space metrics.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import warnings
from collections.abc import Generator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from saekit.atomic import read_regular
from saekit.codes import group_name, open_codes_for
from saekit.devices import Dist, all_reduce_, barrier, init_dist, shutdown_dist
from saekit.errors import SaekitError, is_non_empty, one_line, os_error_message, output_dir
from saekit.measure.heldout import TRAINED_ON, training_record
from saekit.metrics import FiringTracker, ReconstructionStats
from saekit.pursuit import SparseCodes, to_dense
from saekit.sae import ENCODER_STALE, SparseAutoencoder, encoder_cost, load_sae
from saekit.sae.architectures import architecture
from saekit.store import open_store
from saekit.store.format import HookStats
from saekit.store.shards import write_json_atomic
from saekit.store.shuffle import shuffle_plan
from saekit.train.checkpoint import (
    CKPT,
    MetricsLog,
    Position,
    checkpoint_dir,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from saekit.train.config import (
    RUN_IDENTITY,
    TrainConfig,
    jumprelu_training,
    lr_at,
    matryoshka_groups,
    matryoshka_prefixes,
    resolve,
)
from saekit.train.jumprelu import l0_coef_at, start_thresholds_
from saekit.train.loss import Losses, Objective, normalized_variance, pursuit_decode

# --------------------------------------------------------------------------------------------
# What is trained
# --------------------------------------------------------------------------------------------


def build_sae(
    cfg: TrainConfig,
    *,
    d_in: int,
    mean: Tensor,
    mean_sq_norm: float,
    device: Any = "cpu",
    pretrained: SparseAutoencoder | None = None,
) -> SparseAutoencoder:
    """The SAE to train, as the resolved `cfg` (`resolve`) says, on `device`, in train mode, with
    frozen parts marked not trainable (a frozen encoder also stale, in the SAE's metadata).

    New: cfg.n_features latents, inputs normalized by the store's statistics (mean [d_in], E||x||^2).
    From `pretrained` (--from-pretrained): a new encoder (linear path = the dictionary's transpose,
    or the pretrained encoder with --init-encoder; any MLP path starts at zero) over its decoder.
    """
    mlp = {"d_hidden": cfg.d_hidden or None, "n_hidden": cfg.n_hidden, "n_unroll": cfg.unroll}
    arch = architecture(cfg.activation)
    k = cfg.k if arch.has_k else None  # JumpReLU's --k is its target L0, not a k of the SAE
    if pretrained is not None:
        sae = SparseAutoencoder(decoder=pretrained.decoder, k=k, activation=cfg.activation, **mlp)
    else:
        sae = SparseAutoencoder(d_in=d_in, n_features=cfg.n_features, k=k, activation=cfg.activation, **mlp)
    if arch.learns_threshold:
        with torch.no_grad():
            sae.encoder.threshold.fill_(cfg.threshold_init)
    if pretrained is not None:
        if cfg.init_encoder:
            _copy_matching_(sae.encoder, pretrained.encoder)
    else:
        if cfg.normalize:
            sae.set_input_normalization(mean, mean_sq_norm)
        else:
            with torch.no_grad():  # start the bias at the data mean, as the normalized path does
                sae.decoder.b_dec.copy_(mean)
    sae.to(device).train()
    sae.decoder.trainable = bool(cfg.train_decoder)  # resolve() made it True/False
    sae.encoder.trainable = cfg.codes != "pursuit"
    if not sae.encoder.trainable:  # the dictionary moves on without it: saved, it says so (reports mark it)
        sae.metadata[ENCODER_STALE] = True
    return sae


@torch.no_grad()
def _copy_matching_(dst: nn.Module, src: nn.Module) -> None:
    """Copy every tensor of src's state into dst where name and shape agree (W_enc, b_enc, ...)."""
    mine = dst.state_dict()
    for name, t in src.state_dict().items():
        if name in mine and mine[name].shape == t.shape:
            mine[name].copy_(t)


# --------------------------------------------------------------------------------------------
# Data, evaluation
# --------------------------------------------------------------------------------------------


def _batches_per_epoch(store, stop_row: int, local_batch: int, seed: int, epoch: int, world_size: int) -> int:
    """Whole local batches every rank can cut from its share this epoch (ranks stay in lockstep)."""
    shares = [
        sum(
            w.n_rows
            for w in shuffle_plan(
                stop_row,
                store.layout.chunk_rows,
                seed=seed,
                epoch=epoch,
                rank=r,
                world_size=world_size,
                window_blocks=16,
            )
        )
        for r in range(world_size)
    ]
    return min(shares) // local_batch


class Batch(NamedTuple):
    """One local training batch (what `batches` yields)."""

    x: Tensor  # [local_batch, d] bf16
    rows: np.ndarray  # int64 [local_batch] store row of each row of x
    after: Position  # the position after this batch


def batches(
    store, hook: str, *, stop_row: int, local_batch: int, seed: int, start: Position, rank: int = 0, world_size: int = 1
) -> Generator[Batch, None, None]:
    """Endless shuffled local batches, each with its store rows and the position after it."""
    epoch, first = start.epoch, start.batch
    while True:
        n = _batches_per_epoch(store, stop_row, local_batch, seed, epoch, world_size)
        if n == 0:
            raise SaekitError(
                f"--batch-size {local_batch * world_size} is larger than the {stop_row} training rows; lower it or harvest more"
            )
        it = store.shuffled_batches(
            hook,
            local_batch,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            start_batch=first,
            stop_row=stop_row,
            drop_last=True,
            with_rows=True,
        )
        try:
            for i, (x, rows) in zip(range(first, n), it):
                yield Batch(x, rows, Position(0, epoch, i + 1))
        finally:
            it.close()  # stops its prefetch thread
        epoch, first = epoch + 1, 0


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder, store, hook: str, start: int, stop: int, batch_size: int, codes: str, k: int
) -> dict[str, float]:
    """FVU (against the held-out set's mean), L0 and cosine similarity on rows [start, stop), in
    raw activation space, comparable with sae-lens and with `saekit pursue`. (FVU is the same in
    the normalized space, an affine map of it; cosine similarity is not.)"""
    was_training = sae.training
    sae.eval()
    enc, pur = ReconstructionStats(), ReconstructionStats()
    for x in store.iter_rows(hook, batch_size, start, stop):
        x = x.to(sae.device).float()
        out = sae(x)
        enc.update(x, out.reconstruction, out.codes)
        if codes != "encoder":
            pc = pursuit_decode(sae, out.sae_in, k)
            pur.update(x, sae.decoder.denormalize(pc.sae_out), to_dense(pc.codes, sae.n_features))
    sae.train(was_training)
    m = enc.compute()
    result = {"eval/fvu": m.fvu, "eval/l0": m.l0, "eval/cossim": m.cossim}
    if codes != "encoder":
        p = pur.compute()
        result |= {"eval/pursuit_fvu": p.fvu, "eval/pursuit_l0": p.l0}
    return result


class DistillTargets(NamedTuple):
    """Pursuit codes read once from a `saekit pursue` codes store, looked up by store row."""

    codes: SparseCodes  # indices/values [n_code_rows, k]
    start_row: int  # store row of the first code row

    def take(self, rows: np.ndarray) -> SparseCodes:
        """The codes of store rows `rows` (int64 [b]) -> indices/values [b, k]."""
        i = torch.from_numpy(rows - self.start_row)
        return SparseCodes(self.codes.indices[i], self.codes.values[i])


def distill_targets(cfg: TrainConfig, store, hook: str, sae: SparseAutoencoder) -> DistillTargets | None:
    """The --distill-codes, refused in one line unless they were computed from this store, hook and
    dictionary and cover every training row. None without --distill-codes (computed each step).

    The store's codes are over the raw-space dictionary (`saekit pursue`), training's over the
    normalized one: the same codes, since x - b = z W in one space is x_n - b_n = z W_n in the other.
    """
    if not cfg.distill_codes:
        return None
    src = f"--distill-codes {cfg.distill_codes}"
    codes = open_codes_for(cfg.distill_codes, src, store, hook, sae, f"--from-pretrained {cfg.from_pretrained}")
    stop = store.n_rows - cfg.eval_rows
    first, last = codes.start_row, codes.start_row + codes.n_rows
    if first > 0 or last < stop:
        raise SaekitError(
            f"{src} covers store rows [{first}, {last}) but training reads rows [0, {stop}): "
            f"run `saekit pursue --start-row 0 --rows {stop} --method gp --k {cfg.k}` with the same --sae"
        )
    group = cfg.distill_group or group_name("gp", cfg.k)
    if group not in codes.groups:
        raise SaekitError(
            f"{src} has no codes group {group} (it has {', '.join(codes.groups) or 'none'}): "
            f"run `saekit pursue` with --method gp --k {cfg.k}, or pass --distill-group"
        )
    return DistillTargets(codes.codes(group), first)


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class _NoWandb:
    def log(self, data: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _wandb(cfg: TrainConfig, out: Path, run_id: str) -> Any:
    """A wandb run (resumed by id), or a no-op stand-in when not asked for or not installed."""
    if not cfg.wandb:
        return _NoWandb()
    try:
        import wandb  # lazy: optional: only --wandb needs it
    except ImportError:
        warnings.warn("--wandb: the wandb package is not installed; logging to metrics.jsonl only", stacklevel=2)
        return _NoWandb()
    try:
        return wandb.init(
            project=cfg.wandb_project, name=out.name, dir=str(out), config=asdict(cfg), id=run_id, resume="allow"
        )
    except Exception as e:  # no API key, no network, ...
        raise SaekitError(
            f"--wandb: wandb.init failed ({type(e).__name__}: {one_line(e)}); run `wandb login`, set WANDB_MODE=offline, or drop --wandb"
        ) from None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class RunResult(NamedTuple):
    """What `run` returns (on every rank)."""

    out: Path  # the run directory
    sae: SparseAutoencoder  # the trained SAE, in eval mode (normalization kept in its buffers)
    steps: int  # optimizer steps taken in total
    eval: dict[str, float]  # the final held-out metrics (rank 0; {} elsewhere)


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse to reuse a run directory unless resuming one."""
    out = Path(cfg.out)
    if is_non_empty(out):
        if not cfg.resume:
            raise SaekitError(
                f"run directory {out} already exists: pass --resume to continue it, or choose a new --out"
            )
        if not (out / "config.json").is_file():
            raise SaekitError(f"--resume: {out} is not a saekit run directory (no config.json); choose a new --out")


def _check_same_run(out: Path, cfg: TrainConfig, content_hash: str) -> None:
    saved = read_run_config(out)
    diff = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RUN_IDENTITY if saved.get(k) != getattr(cfg, k)]
    if _run_info(out).get("store_hash", content_hash) != content_hash:
        diff.append("the store's contents")
    if diff:
        raise SaekitError(
            f"--resume: {out} was started with different settings ({'; '.join(diff)}); use the same ones or a new --out"
        )


_DAMAGED_FIX = "restore it from a copy, or start over with a new --out"
# Identity fields newer than some run dirs, with the value those runs had (they resume as before).
ADDED_IDENTITY = {"unroll": 0, "distill": 0.0}


def read_run_config(out: str | os.PathLike) -> dict[str, Any]:
    """A run's saved config.json, checked like a --config file (it is read back on --resume)."""
    path = Path(out) / "config.json"
    saved = ADDED_IDENTITY | _read_json(path, "--resume: run config")
    missing = [k for k in RUN_IDENTITY if k not in saved]
    if missing:
        raise SaekitError(f"--resume: run config {path} is damaged (no {', '.join(missing)}); {_DAMAGED_FIX}")
    try:
        return TrainConfig.check_dict(saved, f"--resume: run config {path}")
    except SaekitError as e:
        raise SaekitError(f"{e} ({_DAMAGED_FIX})") from None


def _run_info(out: Path) -> dict:
    path = out / "run.json"
    return _read_json(path, "--resume: run info") if path.is_file() else {}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of the run, or one line saying it is unreadable or damaged."""
    try:
        data = json.loads(read_regular(path))
    except OSError as e:
        raise SaekitError(os_error_message(e, f"{what} {path} is unreadable")) from None
    except ValueError:  # not JSON, not UTF-8
        data = None
    if not isinstance(data, dict):
        raise SaekitError(f"{what} {path} is damaged (not a JSON object); {_DAMAGED_FIX}")
    return data


def run(cfg: TrainConfig) -> RunResult:
    """Train as `cfg` says; under torchrun every rank calls this. See the module docstring."""
    d = init_dist(cfg.device)
    try:
        with output_dir(cfg.out, kept="the last checkpoint is kept"):
            check_run_dir(cfg)
            barrier()  # every rank has checked before rank 0 writes anything
            return _run(cfg, d)
    finally:
        shutdown_dist(d)


def _run(cfg: TrainConfig, d: Dist) -> RunResult:
    store = open_store(cfg.store, cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb)
    hook = store.resolve_hook(cfg.hook)
    d_in = store.d_model(hook)
    if cfg.batch_size % d.world_size:
        raise SaekitError(f"--batch-size {cfg.batch_size} must divide evenly over {d.world_size} ranks")
    if cfg.resume and cfg.init_encoder is None and (Path(cfg.out) / "config.json").is_file():
        # Unset, it defaults to the run's own value: runs saved before --from-pretrained implied
        # --init-encoder (theirs say false) resume under the command that started them.
        cfg = replace(cfg, init_encoder=read_run_config(cfg.out)["init_encoder"])
    torch.manual_seed(cfg.seed)  # before loading: building the pretrained SAE's modules draws from it
    pretrained = load_sae(cfg.from_pretrained, d.device) if cfg.from_pretrained else None
    cfg = resolve(cfg, hook=hook, d_in=d_in, n_rows=store.n_rows, pretrained=pretrained)
    stats = training_stats(store, hook, store.n_rows - cfg.eval_rows)
    sae = build_sae(
        cfg, d_in=d_in, mean=stats.mean, mean_sq_norm=stats.mean_sq_norm, device=d.device, pretrained=pretrained
    )
    sae.metadata.update(_provenance(store, hook))
    stop = store.n_rows - cfg.eval_rows  # it trains on rows [0, stop): the record travels with the SAE
    if sae.arch.learns_threshold and not cfg.threshold_init and not cfg.init_encoder:
        x = store.take(hook, calibration_rows(stop, sae.n_features, cfg.seed)).to(d.device, sae.dtype)
        start_thresholds_(sae.encoder, sae.decoder.normalize(x), sae.decoder.b_dec, cfg.k)
    sae.metadata[TRAINED_ON] = training_record(store, hook, stop, pretrained, cfg.from_pretrained or "")
    if cfg.matryoshka:  # which latents are the nested prefixes: readers of a Matryoshka SAE need them
        sae.metadata["matryoshka_groups"] = list(matryoshka_groups(cfg.matryoshka))
    targets = distill_targets(cfg, store, hook, sae)
    session = _start(cfg, sae, store, d, normalized_variance(sae, stats.mean, stats.mean_sq_norm), targets)
    return _loop(session)


def training_stats(store, hook: str, train_rows: int) -> HookStats:
    """The store's statistics (mean [d], mean squared norm) over the training rows [0, train_rows)
    only: its totals over every row less the held-out rows' float64 sums, so the normalization
    never sees the rows the evaluation measures on."""
    full, n = store.stats(hook), store.n_rows
    total, sq = full.mean.double() * n, full.mean_sq_norm * n
    for x in store.iter_rows(hook, 8192, train_rows, n):
        x = x.double()
        total -= x.sum(0)
        sq -= float(x.pow(2).sum())
    return HookStats((total / train_rows).float(), sq / train_rows)


def _provenance(store, hook: str) -> dict:
    model = store.meta.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    out = {"hook_name": hook, "store_hash": store.content_hash}
    return out | ({"model_name": str(name)} if name else {})


@dataclass
class _Session:
    """What the training loop works with (built by `_start`)."""

    cfg: TrainConfig
    out: Path
    store: Any
    d: Dist
    sae: SparseAutoencoder
    model: nn.Module  # the Objective, DDP-wrapped with several ranks
    opt: torch.optim.Optimizer
    firing: FiringTracker
    log: MetricsLog
    pos: Position
    ckpt_step: int | None  # step of the last checkpoint written or loaded
    targets: DistillTargets | None  # --distill-codes, read once

    @property
    def total(self) -> int:
        return self.cfg.tokens // self.cfg.batch_size

    @property
    def l0_coef(self) -> float:
        """JumpReLU's full sparsity weight (0 for another activation)."""
        spec = jumprelu_training(self.cfg)
        return spec.l0_coef if spec is not None else 0.0

    @property
    def hook(self) -> str:
        """The hook trained on (resolve() fills the config's from the store)."""
        if self.cfg.hook is None:
            raise SaekitError("internal: training started from a config resolve() did not fill; report this")
        return self.cfg.hook

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, logged (rank 0; the others return {})."""
        if not self.d.main:
            return {}
        c = self.cfg
        m = evaluate(
            self.sae,
            self.store,
            self.hook,
            self.store.n_rows - c.eval_rows,
            self.store.n_rows,
            c.batch_size,
            c.codes,
            c.k,
        )
        m |= {"eval/dead_pct": 100 * self.firing.compute().frac_dead}
        self.log.log(self.pos.step, self.pos.step * c.batch_size, m)
        return m

    def checkpoint(self) -> None:
        if self.d.main:
            save_checkpoint(self.out, self.sae, self.opt, self.firing, self.pos)
        self.ckpt_step = self.pos.step
        barrier()


def _start(
    cfg: TrainConfig, sae: SparseAutoencoder, store, d: Dist, variance: float, targets: DistillTargets | None
) -> _Session:
    """Open (or resume) the run directory, wrap the objective for DDP, restore the checkpoint.

    Everything read back (config, run info, checkpoint, metrics) is checked before anything in
    the run directory is written, so a damaged file fails in one line and changes nothing."""
    out = Path(cfg.out)
    fresh = not (out / "config.json").is_file()
    if not fresh:
        _check_same_run(out, cfg, store.content_hash)
    ckpt = None if fresh else checkpoint_dir(out)

    prefixes = matryoshka_prefixes(cfg.matryoshka)
    model: nn.Module = Objective(
        sae, cfg.codes, cfg.k, cfg.k_aux, cfg.auxk_coef, variance, cfg.distill, prefixes, jumprelu_training(cfg)
    )
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: only DDP training needs it

        # Buffers (normalization, Batch-TopK threshold) are not re-synced each forward: the
        # normalization is identical on every rank, and rank 0's threshold is the one saved.
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers"
        )
        no_sync: dict[str, Any] = {sync: False}
        model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **no_sync)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr)
    firing = FiringTracker(sae.n_features, window=cfg.dead_tokens, device=d.device)
    pos = load_checkpoint(ckpt, sae, opt, firing) if ckpt is not None else Position()
    log = MetricsLog(out, _NoWandb(), d.main, keep_until=pos.step if ckpt is not None else -1)
    barrier()
    if d.main:
        info = _run_info(out) | {
            "d_in": sae.d_in,
            "encoder_cost": encoder_cost(sae),
            "steps": cfg.tokens // cfg.batch_size,
            "world_size": d.world_size,
            "store_hash": store.content_hash,
        }
        info.setdefault("wandb_id", os.urandom(6).hex())
        out.mkdir(parents=True, exist_ok=True)
        try:
            log.wandb = _wandb(cfg, out, info["wandb_id"])
        except SaekitError:
            if fresh:  # leave no half-made run dir that would need --resume
                shutil.rmtree(out, ignore_errors=True)
            raise
        write_json_atomic(out / "config.json", asdict(cfg))
        write_json_atomic(out / "run.json", info)
    ckpt_step = pos.step if ckpt is not None else None
    return _Session(cfg, out, store, d, sae, model, opt, firing, log, pos, ckpt_step, targets)


def _loop(s: _Session) -> RunResult:
    """Train from s.pos to the budget: step, log, evaluate, checkpoint; then publish the SAE."""
    from tqdm import tqdm  # lazy: only a progress bar needs it

    cfg, d, total = s.cfg, s.d, s.total
    bar = tqdm(total=total, initial=s.pos.step, unit="step", disable=not (d.main and cfg.progress), dynamic_ncols=True)
    last_eval = s.evaluate() if s.pos.step == 0 else {}
    data = batches(
        s.store,
        s.hook,
        stop_row=s.store.n_rows - cfg.eval_rows,
        local_batch=cfg.batch_size // d.world_size,
        seed=cfg.seed,
        start=s.pos,
        rank=d.rank,
        world_size=d.world_size,
    )
    try:
        while s.pos.step < total:
            x, rows, after = next(data)
            lr = lr_at(s.pos.step, total, cfg.lr, cfg.warmup_frac, cfg.decay_frac)
            target = s.targets.take(rows) if s.targets is not None else None
            x = x.to(d.device, non_blocking=True)
            l0 = l0_coef_at(s.pos.step, s.l0_coef, int(total * cfg.l0_warmup_frac)) if s.l0_coef else None
            stats = train_step(s.model, s.sae, s.opt, s.firing, x, lr, d.world_size, target, l0)
            if not all(math.isfinite(v) for v in stats.values()):
                raise SaekitError(_non_finite_message(stats["train/loss"], s))
            s.pos = after._replace(step=s.pos.step + 1)
            bar.update(1)
            if s.pos.step % cfg.log_every == 0 or s.pos.step == total:
                s.log.log(s.pos.step, s.pos.step * cfg.batch_size, {**stats, "train/lr": lr})
                bar.set_postfix(fvu=f"{stats['train/fvu'] or stats['train/pursuit_fvu']:.4f}")
            if s.pos.step == total and s.sae.arch.calibrates:
                calibrate_threshold(s.sae, s.store, s.hook, s.store.n_rows - cfg.eval_rows, d.device, cfg.seed)
            if s.pos.step % cfg.eval_every == 0 or s.pos.step == total:
                last_eval = s.evaluate()
            if (cfg.checkpoint_every and s.pos.step % cfg.checkpoint_every == 0) or s.pos.step == total:
                s.checkpoint()
    finally:
        data.close()
        bar.close()
    s.sae.eval()
    if d.main:
        if not last_eval:  # resumed a run that had already finished: report its last evaluation
            last_eval = {
                k: v for k, v in next(m for m in reversed(read_metrics(s.out)) if "eval/fvu" in m).items() if "/" in k
            }
        _publish(s.out, s.sae)
        s.log.wandb.finish()
    barrier()
    return RunResult(s.out, s.sae, s.pos.step, last_eval)


def calibrate_threshold(sae: SparseAutoencoder, store, hook: str, stop_row: int, device, seed: int) -> float:
    """Batch-TopK, after the last step: fix the inference threshold on a random sample of the
    training rows (`calibration_rows`, the same on every rank, so every rank gets the same
    threshold) instead of the running estimate."""
    idx = calibration_rows(stop_row, sae.n_features, seed)
    return sae.calibrate_threshold_(store.take(hook, idx).to(device, sae.dtype))


def calibration_rows(stop_row: int, n_features: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of a seeded random sample of the training rows [0, stop_row): enough
    rows for about 2**24 pre-activations (256 to 16,384). A random sample, not the first rows:
    those are a handful of sequences (5 at n_features 24,576), not the training distribution."""
    n = min(stop_row, max(256, min(16384, 2**24 // n_features)))
    return np.sort(np.random.default_rng(seed).choice(stop_row, size=n, replace=False))


def _non_finite_message(loss: float, s: _Session) -> str:
    if s.ckpt_step is None:
        where = "no checkpoint was written yet"
    else:
        where = f"the last good checkpoint (step {s.ckpt_step}) is in {s.out / CKPT}"
    return f"loss became {loss} at step {s.pos.step + 1}; stopped before applying it, {where}: lower --lr and --resume"


LOSS_NAMES = (
    "train/loss",
    "train/fvu",
    "train/auxk",
    "train/pursuit_fvu",
    "train/distill",
    "train/matryoshka",
    "train/sparsity",
)
"""The metrics.jsonl names of `Losses`' scalar fields, in order."""


def train_step(
    model: nn.Module,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    firing: FiringTracker,
    x: Tensor,
    lr: float,
    world_size: int = 1,
    target: SparseCodes | None = None,
    l0_coef: float | None = None,
) -> dict[str, float]:
    """One optimizer step on local batch x [b, d]; returns the batch's losses averaged over ranks.
    target: indices/values [b, k] pursuit codes of x's rows to distill from (None: computed, if distilling);
    l0_coef: JumpReLU's sparsity weight at this step (None: its full value).

    A non-finite loss returns before the optimizer step, so the weights stay the last good ones.
    """
    for g in opt.param_groups:
        g["lr"] = lr
    losses: Losses = model(x, firing.dead_mask(), target, l0_coef)
    losses.loss.backward()  # DDP averages the gradients over ranks here
    # One all-reduce carries the losses for logging and the firing counts for dead latents.
    n = len(LOSS_NAMES)
    packed = all_reduce_(torch.cat([torch.stack(losses[:n]).detach().float(), losses.counts.detach().float()]))
    values = (packed[:n] / world_size).tolist()
    stats: dict[str, float] = dict(zip(LOSS_NAMES, values))
    if not math.isfinite(values[0]):
        opt.zero_grad(set_to_none=True)
        return stats
    if sae.decoder.trainable:
        sae.decoder.remove_parallel_grad_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sae.decoder.trainable:
        sae.decoder.normalize_rows_()
    firing.update_counts(packed[n:], x.shape[0] * world_size)
    return stats


def _publish(out: Path, sae: SparseAutoencoder) -> None:
    """The final SAE in saekit format (sae/) and, where sae-lens has the architecture, sae_lens/."""
    sae.save(out / "sae", overwrite=True)
    if sae.encoder.mlp is None and not sae.n_unroll:
        sae.export_sae_lens(out / "sae_lens", overwrite=True)

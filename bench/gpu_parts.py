"""The parts of bench/gpu_check.py: each runs in its own process (`gpu_check.py --part NAME`)
and saves what it measures to WORK/NAME.json after every step (see gpu_check.py for what each
part measures, docs/gpu.md for what the figures mean).

DEV is the device under test (`--device`, cuda on the GPU machine, cpu in the dry run); every
part also runs on the CPU what it compares DEV with.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

PARTS = ("env", "harvest", "ddp", "pursuit", "eval")


class Sizes(NamedTuple):
    """Every size the check uses; FULL on a GPU machine, TINY for the dry run."""

    tokens: int  # rows of the DEV bf16 harvest of the embedded model (ctx_len 128)
    cpu_tokens: int  # rows of the CPU and DEV fp32 harvests: the parity compares these rows
    shard_rows: int
    gpt2_tokens: int  # rows of the GPT-2-small-shape harvest (0: skipped)
    fallback_tokens: int  # rows of the CPU store a part harvests when the harvest part made none
    n_features: int  # SAE latents trained on the store (d_model 128)
    k: int
    train_tokens: int
    train_batch: int
    step: tuple[int, int, int, int]  # bench/train.py's step: d_in, n_features, k, batch
    step_runs: tuple[int, int]  # timed steps on DEV, on the CPU
    pursuit: tuple[int, int, int]  # d, n_features, batch
    pursuit_ks: tuple[int, ...]
    parity_rows: int  # rows of the DEV-vs-CPU pursuit parity
    repeats: int  # timings per measurement (the median is reported)
    timeouts: dict[str, int]  # seconds per part


FULL = Sizes(
    tokens=1_048_576,
    cpu_tokens=262_144,
    shard_rows=65536,
    gpt2_tokens=262_144,
    fallback_tokens=262_144,
    n_features=2048,
    k=32,
    train_tokens=4096 * 100,
    train_batch=4096,
    step=(768, 6144, 32, 2048),
    step_runs=(50, 5),
    pursuit=(768, 24576, 4096),
    pursuit_ks=(32, 64),
    parity_rows=256,
    repeats=3,
    timeouts={"env": 60, "harvest": 150, "ddp": 150, "pursuit": 90, "eval": 120},
)
TINY = Sizes(
    tokens=4096,
    cpu_tokens=2048,
    shard_rows=1024,
    gpt2_tokens=0,
    fallback_tokens=4096,
    n_features=256,
    k=8,
    train_tokens=256 * 8,
    train_batch=256,
    step=(32, 128, 4, 64),
    step_runs=(2, 2),
    pursuit=(64, 512, 128),
    pursuit_ks=(4, 8),
    parity_rows=32,
    repeats=1,
    timeouts={"env": 60, "harvest": 120, "ddp": 120, "pursuit": 60, "eval": 120},
)


@dataclass
class Ctx:
    """What a part works with; `res` is saved to WORK/PART.json after every step."""

    part: str
    device: str
    sizes: Sizes
    work: Path
    res: dict
    t0: float

    def log(self, msg: str) -> None:
        print(f"{time.monotonic() - self.t0:6.1f}s  {msg}", flush=True)

    def save(self) -> None:
        tmp = self.work / f".{self.part}.json.tmp"
        tmp.write_text(json.dumps(self.res, indent=1, default=str))
        os.replace(tmp, self.work / f"{self.part}.json")

    @contextmanager
    def step(self, name: str) -> Iterator[dict]:
        """One measurement: its figures land in res[name]; an error is noted and the part goes on."""
        box = self.res.setdefault(name, {})
        self.log(f"{name} ...")
        try:
            yield box
            self.log(f"{name} done")
        except Exception as e:  # the check's job is to report every failure and carry on
            traceback.print_exc()
            msg = error_line(name, e)
            box["error"] = msg
            self.res.setdefault("errors", []).append(msg)
            self.log(f"{name} FAILED")
        finally:
            self.save()


def run_part(part: str, device: str, tiny: bool, work: Path) -> int:
    """Run one part here; its exit status (0 even when some of its steps failed: they are noted)."""
    ctx = Ctx(part, device, TINY if tiny else FULL, work, {}, time.monotonic())
    try:
        globals()[f"part_{part}"](ctx)
    except Exception as e:  # outside the part's own steps (e.g. getting a store): the part ends
        traceback.print_exc()
        ctx.res.setdefault("errors", []).append(error_line(part, e))
        ctx.save()
        return 1
    return 0


def error_line(what: str, e: BaseException) -> str:
    return f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def clock(device: str) -> float:
    from saekit.devices import device_clock

    return device_clock(torch.device(device))


def median_time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (module load, kernel selection)."""
    fn()
    times = []
    for _ in range(repeats):
        t = clock(device)
        fn()
        times.append(clock(device) - t)
    return statistics.median(times)


def store_complete(path: Path) -> bool:
    from saekit.store import read_attrs

    attrs = read_attrs(path) if path.is_dir() else None
    return bool(attrs and attrs.get("complete"))


def the_store(ctx: Ctx) -> str:
    """The harvest part's DEV bf16 store; without it (that part failed or was left out) a small CPU
    one harvested here, so that this part stands alone."""
    main = ctx.work / "store-dev-bf16"
    if store_complete(main):
        ctx.res["store"] = "the harvest part's DEV bf16 store"
        return str(main)
    fallback = ctx.work / "store-fallback"
    if not store_complete(fallback):
        from saekit import harvest

        ctx.log(f"no harvest store: harvesting {ctx.sizes.fallback_tokens} rows on the CPU (fp32)")
        harvest.run(harvest_config(ctx, fallback, ctx.sizes.fallback_tokens, device="cpu"))
    ctx.res["store"] = "a CPU fp32 store harvested by this part (the harvest part made none)"
    return str(fallback)


def harvest_config(ctx: Ctx, out: Path, tokens: int, **kw):
    from saekit.harvest import HarvestConfig

    rows = ctx.sizes.shard_rows
    return HarvestConfig(out=str(out), tokens=tokens, shard_rows=rows, chunk_rows=min(4096, rows), progress=False, **kw)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors of two state dicts (inf when their keys or shapes differ)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel()), default=0.0)


def cli(ctx: Ctx, args: list[str], torchrun: bool = False) -> float:
    """`saekit ARGS` (under `torchrun --standalone --nproc_per_node 1` if asked) in a new process;
    its wall seconds. Raises with the last lines of its output when it fails."""
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
    )
    cmd = (launch or [sys.executable]) + ["-m", "saekit.cli.main", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ctx.work, capture_output=True, text=True)
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-6:])
        raise RuntimeError(f"`saekit {args[0]}`{' under torchrun' if torchrun else ''} exited {r.returncode}: {tail}")
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------------

IMPORTS = ("numpy", "safetensors", "transformers", "zarr", "numcodecs", "crc32c", "transformer_lens", "sae_lens")
IMPORTS += ("datasets", "wandb", "typer", "matplotlib")


def part_env(ctx: Ctx) -> None:
    with ctx.step("versions") as r:
        r |= {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
        r |= {"cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            r |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30)}
            r |= {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "nccl": torch.distributed.is_nccl_available()}
        ctx.log(", ".join(f"{k} {v}" for k, v in r.items()))
    with ctx.step("imports") as r:
        missing = []
        for name in IMPORTS:
            try:
                mod = __import__(name)
                r[name] = getattr(mod, "__version__", "ok")
            except Exception as e:  # any import failure is the finding, whatever it raises
                r[name] = f"{type(e).__name__}: {e}"
                missing.append(name)
        ctx.log(", ".join(f"{k} {v}" for k, v in r.items()))
        if missing:
            raise RuntimeError(f"cannot import {', '.join(missing)} (carry them as wheels: bench/gpu_wheels.sh)")
    with ctx.step("cli") as r:
        r["seconds"] = cli(ctx, ["--help"])  # `python -m saekit.cli.main`, as the ddp part runs it


# ---------------------------------------------------------------------------------------------
# harvest
# ---------------------------------------------------------------------------------------------


def part_harvest(ctx: Ctx) -> None:
    s = ctx.sizes
    runs = {"dev_bf16": (ctx.device, torch.bfloat16, s.tokens), "cpu_fp32": ("cpu", torch.float32, s.cpu_tokens)}
    runs["dev_fp32"] = (ctx.device, torch.float32, s.cpu_tokens)
    for name, (device, dtype, tokens) in runs.items():
        with ctx.step(f"harvest_{name}") as r:
            r |= harvest_embedded(ctx, ctx.work / f"store-{name.replace('_', '-')}", device, dtype, tokens)
            ctx.log(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, harvest/bare {r['harvest_over_bare']:.2f}")
    pairs = {"bf16_vs_cpu_fp32": ("dev-bf16", "cpu-fp32"), "dev_fp32_vs_cpu_fp32": ("dev-fp32", "cpu-fp32")}
    for name, (a, b) in pairs.items():
        with ctx.step(f"parity_{name}") as r:
            r |= compare_stores(ctx.work / f"store-{a}", ctx.work / f"store-{b}")
            ctx.log(
                f"{name}: rel err {r['rel_err']:.2e}, row max {r['row_rel_max']:.2e}, bit-equal {r['bitwise_equal_frac']:.4f}"
            )
    if ctx.sizes.gpt2_tokens and ctx.device != "cpu":
        with ctx.step("harvest_gpt2_small_random_bf16") as r:
            from harvest import gpt2_small_random

            lm = gpt2_small_random(ctx.device, torch.bfloat16)
            hook = "blocks.8.hook_resid_pre"
            r |= harvest_timed(ctx, lm, hook, ctx.work / "store-gpt2", ctx.sizes.gpt2_tokens)
            shutil.rmtree(ctx.work / "store-gpt2", ignore_errors=True)


def harvest_embedded(ctx: Ctx, out: Path, device: str, dtype, tokens: int) -> dict:
    from saekit import models

    lm = models.load_model(None, torch.device(device), dtype)
    return harvest_timed(ctx, lm, models.default_hook(lm.model), out, tokens)


def harvest_timed(ctx: Ctx, lm, hook: str, out: Path, tokens: int) -> dict:
    """Harvest `tokens` rows (the CLI's path: `harvest.run_loaded`, after the model is loaded) and
    a bare forward to the hooked layer over the same sequences and batches, nothing stored."""
    from saekit import harvest, texts
    from saekit.harvest import loop as harvest_loop

    model, device, corpus = lm.model, str(lm.model.cfg.device), texts.load_texts(None)
    cfg = harvest_config(ctx, out, tokens, hooks=[hook], overwrite=True)
    plan = harvest_loop.make_plan(
        lm, [hook], corpus, ctx_len=0, skip=1, n_rows=tokens, shard_rows=cfg.shard_rows, batch_size=0
    )
    n_seq = -(-tokens // plan.layout.per_seq)
    seqs = torch.tensor([s for _, s in zip(range(n_seq), texts.sequences(model, corpus, plan.ctx_len))])
    layer = int(hook.split(".")[1])

    def bare(batches: int | None = None) -> None:
        with torch.inference_mode():
            for b in seqs.split(plan.batch_size)[:batches]:
                model(b.to(device), stop_at_layer=layer)

    bare(1)  # warm-up: allocations, kernel selection (the harvest below runs warm too)
    repeats = 1 if device == "cpu" else ctx.sizes.repeats  # the CPU is slow and steady: one pass
    times = []
    for _ in range(repeats):
        t = clock(device)
        bare()
        times.append(clock(device) - t)
    t_bare = statistics.median(times)
    t = clock(device)
    res = harvest.run_loaded(cfg, lm, corpus)
    t_harvest = clock(device) - t
    return {
        "device": device,
        "dtype": str(model.cfg.dtype),
        "hook": hook,
        "rows": res.n_rows,
        "batch_size": plan.batch_size,
        "tokens_per_s": res.n_rows / t_harvest,
        "bare_tokens_per_s": n_seq * plan.layout.per_seq / t_bare,
        "harvest_over_bare": (res.n_rows / t_harvest) / (n_seq * plan.layout.per_seq / t_bare),
        "content_hash": res.content_hash,
    }


def compare_stores(a: Path, b: Path, chunk: int = 65536) -> dict:
    """Store a against reference b on the rows both have (row i is the same token position in any
    store of the same model, texts and ctx_len): ||a - b|| / ||b|| over everything and per row,
    the fraction of bit-equal values, equal token ids, and the content hashes."""
    from saekit.store import open_store
    from saekit.store.format import content_hash

    A, B = open_store(a), open_store(b)
    n = min(A.n_rows, B.n_rows)
    diff2 = ref2 = row_sum = 0.0
    row_max, equal, tokens_equal = 0.0, 0, True
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        ra, rb = A.rows(None, s, e), B.rows(None, s, e)
        equal += int((ra.view(torch.int16) == rb.view(torch.int16)).sum())
        fa, fb = ra.double(), rb.double()
        diff = (fa - fb).norm(dim=1)
        diff2, ref2 = diff2 + float((diff**2).sum()), ref2 + float((fb**2).sum())
        rel = diff / fb.norm(dim=1).clamp_min(1e-30)
        row_sum, row_max = row_sum + float(rel.sum()), max(row_max, float(rel.max()))
        tokens_equal &= bool(torch.equal(A.tokens(s, e), B.tokens(s, e)))
    return {
        "rows": n,
        "rel_err": math.sqrt(diff2 / ref2),
        "row_rel_mean": row_sum / n,
        "row_rel_max": row_max,
        "bitwise_equal_frac": equal / (n * A.d_model()),
        "tokens_equal": tokens_equal,
        "content_hash_equal": A.content_hash == B.content_hash,
        # meta records the device type and dtype, so stores from two devices never share a hash;
        # with b's meta in a's place, the hash covers the rest: data checksums and statistics
        "content_hash_equal_but_meta": content_hash({**B.attrs, "meta": A.meta}) == A.content_hash
        if A.n_rows == B.n_rows
        else None,
    }


# ---------------------------------------------------------------------------------------------
# ddp
# ---------------------------------------------------------------------------------------------


def part_ddp(ctx: Ctx) -> None:
    s = ctx.sizes
    store = the_store(ctx)
    flags = ["--store", store, "--n-features", s.n_features, "--k", s.k, "--tokens", s.train_tokens]
    flags += ["--batch-size", s.train_batch, "--seed", 0, "--log-every", 1, "--checkpoint-every", 0, "--no-progress"]
    flags = [str(f) for f in flags]
    runs = {"plain": (ctx.device, False), "torchrun": (ctx.device, True)}
    if ctx.device != "cpu":
        runs["cpu"] = ("cpu", False)
    for name, (device, torchrun) in runs.items():
        with ctx.step(f"train_{name}") as r:
            secs = cli(ctx, ["train", *flags, "--device", device, "--out", str(ctx.work / f"run-{name}")], torchrun)
            r |= {"device": device, "seconds": secs, "tokens_per_s_end_to_end": s.train_tokens / secs}
            r |= final_metrics(ctx.work / f"run-{name}")
            ctx.log(f"{name}: {secs:.1f} s, final eval fvu {r.get('eval/fvu')}")
    for other in [n for n in runs if n != "plain"]:
        with ctx.step(f"{other}_vs_plain") as r:
            r |= compare_runs(ctx.work / f"run-{other}", ctx.work / "run-plain")
            ctx.log(
                f"{other} vs plain: max |dW| {r['weights_max_abs_diff']:.2e}, max |dmetric| {r['metrics_max_abs_diff']:.2e}"
            )
    with ctx.step("train_step") as r:
        r |= step_throughput(ctx)
    with ctx.step("ddp_one_rank") as r:
        r |= ddp_one_rank(ctx)


def final_metrics(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    last_eval = [m for m in read_metrics(run) if "eval/fvu" in m][-1]
    return {"world_size": info.get("world_size"), **{k: v for k, v in last_eval.items() if k.startswith("eval/")}}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def compare_runs(a: Path, b: Path) -> dict:
    """Final SAE weights and every logged metric (same steps) of two run directories."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r / "sae" / "sae.safetensors")) for r in (a, b))
    ma, mb = ({(m["step"], k): v for m in read_metrics(r) for k, v in m.items()} for r in (a, b))
    nums = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    diffs = [abs(ma[key] - mb[key]) for key in ma.keys() & mb.keys() if nums(ma[key]) and nums(mb[key])]
    return {
        "weights_max_abs_diff": max_abs_diff(wa, wb),
        "metrics_max_abs_diff": max(diffs, default=math.inf),
        "metrics_compared": len(diffs),
        "same_metric_keys": ma.keys() == mb.keys(),
    }


def step_rows(d: int, rows: int):
    """bf16 rows with a nonzero mean (as read from a store) and their statistics."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, d, generator=g) + torch.randn(d, generator=g)).bfloat16()
    return x, x.float().mean(0), float(x.float().pow(2).sum(1).mean())


def step_throughput(ctx: Ctx) -> dict:
    """bench/train.py's step (saekit's train_step as `saekit train` runs it) on DEV and the CPU."""
    from train import SaekitStep, ram_batches, tokens_per_s

    d, n, k, batch = ctx.sizes.step
    x, mean, msn = step_rows(d, 4 * batch)
    out = {"shape": {"d_in": d, "n_features": n, "k": k, "batch": batch}}
    for name, device, steps in zip(("dev", "cpu"), (ctx.device, "cpu"), ctx.sizes.step_runs):
        dev = torch.device(device)
        step, data = SaekitStep(d, n, k, mean.to(dev), msn, dev), ram_batches(x, batch)
        tokens_per_s(step, data, 2, dev)  # warm-up
        out[f"{name}_tokens_per_s"] = tokens_per_s(step, data, steps, dev)
        ctx.log(f"train step on {device}: {out[f'{name}_tokens_per_s']:,.0f} tokens/s")
    out["dev_over_cpu"] = out["dev_tokens_per_s"] / out["cpu_tokens_per_s"]
    return out


def ddp_one_rank(ctx: Ctx) -> dict:
    """The training step DDP-wrapped over a one-rank process group (nccl on a GPU, gloo on the
    CPU), as `saekit train` wraps it under torchrun with several ranks, against the same steps
    unwrapped: the gradient all-reduce runs, and the SAE must come out the same."""
    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel as DDP
    from train import SaekitStep, ram_batches

    d, n, k, batch = ctx.sizes.step
    dev = torch.device(ctx.device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    x, mean, msn = step_rows(d, 4 * batch)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)  # an index is required: set_device(torch.device("cuda")) raises
    td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1)
    try:
        plain, wrapped = (SaekitStep(d, n, k, mean.to(dev), msn, dev) for _ in range(2))
        # as saekit.train wraps the objective: buffers (normalization) are not re-synced each forward
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else "broadcast_buffers"
        )
        ids = [dev.index] if dev.type == "cuda" else None
        wrapped.model = DDP(wrapped.model, device_ids=ids, **{sync: False})
        for step in (plain, wrapped):
            data = ram_batches(x, batch)
            for _ in range(5):
                step(next(data).to(dev))
        diff = max_abs_diff(plain.sae.state_dict(), wrapped.sae.state_dict())
    finally:
        td.destroy_process_group()
    ctx.log(f"DDP ({backend}, one rank) vs plain: max |dW| {diff:.2e}")
    return {"backend": backend, "steps": 5, "weights_max_abs_diff": diff}


# ---------------------------------------------------------------------------------------------
# pursuit
# ---------------------------------------------------------------------------------------------


def part_pursuit(ctx: Ctx) -> None:
    from pursuit import make_inputs

    (d, n, b), ks = ctx.sizes.pursuit, ctx.sizes.pursuit_ks
    inputs = make_inputs(d, n, max(ks), b, 0, ctx.device)
    for k in ks:
        with ctx.step(f"gp_k{k}") as r, torch.no_grad():
            r |= pursuit_speed(ctx, *inputs, k)
    with ctx.step("parity") as r, torch.no_grad():
        r |= pursuit_parity(ctx, d, n, ks[0])


def pursuit_speed(ctx: Ctx, x: torch.Tensor, W: torch.Tensor, b_dec: torch.Tensor, k: int) -> dict:
    """saekit's gradient pursuit against the original formulation and k bare [b, d] x [d, n]
    matmuls (the floor for any k-step pursuit), as bench/pursuit.py times them; rows/s, FVU."""
    from pursuit import fvu

    from saekit.pursuit import gradient_pursuit, original_gradient_pursuit, reconstruct

    (b, d), n = x.shape, W.shape[0]
    xc, buf = x - b_dec, x.new_empty(b, n)

    def floor() -> None:
        for _ in range(k):
            torch.mm(xc, W.T, out=buf)

    gp = lambda: gradient_pursuit(x, W, k, b_dec=b_dec, chunk_size=b)
    orig = lambda: original_gradient_pursuit(x, W, k, b_dec=b_dec)
    t = {
        name: median_time(fn, ctx.device, ctx.sizes.repeats)
        for name, fn in (("floor", floor), ("gp", gp), ("original", orig))
    }
    r = {"shape": {"d": d, "n": n, "k": k, "b": b}, "seconds": t, "rows_per_s": b / t["gp"]}
    r |= {"original_over_gp": t["original"] / t["gp"], "gp_over_floor": t["gp"] / t["floor"]}
    r |= {"fvu_gp": fvu(x, reconstruct(gp(), W, b_dec)), "fvu_original": fvu(xc, orig() @ W)}
    ctx.log(
        f"k {k}: {r['rows_per_s']:,.0f} rows/s, original/gp {r['original_over_gp']:.2f}, gp/floor {r['gp_over_floor']:.2f}"
    )
    return r


def pursuit_parity(ctx: Ctx, d: int, n: int, k: int) -> dict:
    """gp codes and FVU on DEV against the CPU, same inputs (drawn on the CPU)."""
    from pursuit import fvu, make_inputs

    from saekit.pursuit import gradient_pursuit, reconstruct

    x, W, b_dec = make_inputs(d, n, k, ctx.sizes.parity_rows, 1, "cpu")
    ref = gradient_pursuit(x, W, k, b_dec=b_dec)
    dev = [t.to(ctx.device) for t in (x, W, b_dec)]
    got = gradient_pursuit(dev[0], dev[1], k, b_dec=dev[2])
    got = type(ref)(got.indices.cpu(), got.values.cpu())
    order = lambda c: c.indices.sort(dim=1)
    (ri, rp), (gi, gp_) = order(ref), order(got)
    same = (ri == gi).all(dim=1)
    rv, gv = ref.values.gather(1, rp), got.values.gather(1, gp_)
    f_ref, f_got = fvu(x, reconstruct(ref, W, b_dec)), fvu(x, reconstruct(got, W, b_dec))
    out = {
        "rows": x.shape[0],
        "k": k,
        "rows_same_support": float(same.float().mean()),
        "values_max_rel_diff_same_support": float((rv - gv)[same].abs().max() / rv.abs().max()) if same.any() else None,
        "fvu_cpu": f_ref,
        "fvu_dev": f_got,
        "fvu_rel_diff": abs(f_got - f_ref) / f_ref,
    }
    ctx.log(f"parity k {k}: {out['rows_same_support']:.3f} rows same support, fvu rel diff {out['fvu_rel_diff']:.1e}")
    return out


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def part_eval(ctx: Ctx) -> None:
    from saekit import eval as saekit_eval
    from saekit import train

    s, store = ctx.sizes, the_store(ctx)
    run_dir = ctx.work / "eval-sae"
    with ctx.step("quick_sae") as r:
        kw = dict(n_features=s.n_features, k=s.k, tokens=s.train_tokens, batch_size=s.train_batch, checkpoint_every=0)
        cfg = train.TrainConfig(store=store, out=str(run_dir), device=ctx.device, progress=False, **kw)
        r["eval_fvu"] = train.run(cfg).eval.get("eval/fvu")

    def evaluate(device: str, name: str, sequences: int = 0) -> tuple[Any, float]:
        out = str(ctx.work / f"eval-{name}")
        kw = dict(k=[s.k], methods=["gp"], device=device, progress=False, sequences=sequences)
        cfg = saekit_eval.EvalConfig(store=store, sae=str(run_dir), out=out, **kw)
        t = clock(device)
        res = saekit_eval.run(cfg)
        return res, clock(device) - t

    got = {}
    for name, device in {"dev": ctx.device, "cpu": "cpu"}.items():
        with ctx.step(f"eval_{name}") as r:
            if name == "dev":  # the CUDA context, cuBLAS handles and kernel choice stay out of the timing
                evaluate(device, f"{name}-warmup", sequences=2)
            got[name], secs = evaluate(device, name)
            tokens = got[name].header["tokens"]
            r |= {"device": device, "seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs}
            r["rows"] = {e.method + (f"@{e.k:g}" if e.k else ""): e.metrics.as_json() for e in got[name].entries}
            ctx.log(f"eval on {device}: {tokens} tokens in {secs:.1f} s")
    with ctx.step("parity") as r:
        rows = lambda res: {e.method + (f"@{e.k:g}" if e.k else ""): e.metrics for e in res.entries}
        dev, cpu = rows(got["dev"]), rows(got["cpu"])
        r |= {f"{f}_max_abs_diff": max_field_diff(dev, cpu, f) for f in ("ce", "kl_mean", "fvu")}
        r["speedup"] = ctx.res["eval_dev"]["tokens_per_s"] / ctx.res["eval_cpu"]["tokens_per_s"]
        ctx.log(f"CE max |d| {r['ce_max_abs_diff']:.1e} nats, KL max |d| {r['kl_mean_max_abs_diff']:.1e}")


def max_field_diff(a: dict, b: dict, field: str) -> float:
    """Largest |a - b| of one metric over the report rows both have; a NaN on one side only is inf."""
    diffs = []
    for m in a.keys() & b.keys():
        x, y = getattr(a[m], field), getattr(b[m], field)
        if math.isnan(x) != math.isnan(y):
            return math.inf
        diffs.append(0.0 if math.isnan(x) else abs(x - y))
    return max(diffs, default=math.inf)

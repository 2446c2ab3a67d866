"""saekit's GPU paths, checked and timed in one call of a lent GPU machine (see docs/gpu.md).

    bench/gpu_check.sh                                # on the GPU machine: installs .whl/, runs this
    python bench/gpu_check.py --device cpu --tiny     # dry run: every part on the CPU, tiny (CI)

Parts, each in its own process with its own time limit, so that a crash, a hang or a CUDA error
in one is reported and the others still run (each saves what it measured as it goes):
  env      versions, the GPU, whether every package saekit imports is there
  harvest  the embedded default harvested three ways: DEV bf16 (`saekit harvest --device cuda
           --dtype bf16`), CPU fp32, DEV fp32. Tokens/s of each and its ratio to a bare forward to
           the hooked layer on the same device (as bench/harvest.py); parity of the stores: the bf16
           model's against the CPU's (a bf16 model: relative error ~1e-2), DEV fp32 against the CPU
           (bf16 rounding flips only: <1e-3); GPT-2-small's shape (random weights) too on a GPU
  ddp      `saekit train` on the store under `torchrun --nproc_per_node 1` against the same run in
           one process, both on DEV (final SAE and metrics should match closely), and on the CPU;
           the training step's tokens/s on DEV and the CPU (bench/train.py's step); DDP over a
           one-rank process group (nccl on a GPU, gloo on the CPU) against the plain step
  pursuit  gradient pursuit at GPT-2 shapes (d 768, n 24576, k 32 / 64, b 4096): rows/s, against
           the original formulation and k bare matmuls; codes and FVU on DEV against the CPU
  eval     `saekit eval` on the store with a quickly trained SAE, on DEV and on the CPU:
           tokens/s and CE / KL parity
Progress lines come as they happen; a table comes last; everything measured goes to
$OUT/gpu_check.json (or --out) with every part's output in gpu_check.log beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))  # the other benchmarks: their models, steps and inputs

from gpu_parts import FULL, PARTS, TINY, run_part  # noqa: E402

DEFAULT_BUDGET_S = 420  # the whole check; the `run` call's timeout_s leaves a minute more (docs/gpu.md)

# What each comparison should show (the table prints these beside the figures).
EXPECT = {
    "bf16_vs_fp32": "~1e-2 (a bf16 model)",
    "fp32_vs_fp32": "<1e-3 (bf16 rounding flips only)",
    "same_run": "~0 (<1e-3: CUDA atomics)",
    "ce_kl": "<1e-3 nats (fp32 both)",
    "pursuit_rows": ">0.95 rows, fvu rel <1e-3",
}


# ---------------------------------------------------------------------------------------------
# The parent: one process per part, a time limit each, the table
# ---------------------------------------------------------------------------------------------


def main() -> None:
    a = parse_args()
    if a.part:
        sys.exit(run_part(a.part, a.device, a.tiny, Path(a.work)))
    out = a.out or os.environ.get("OUT", "")
    work = Path(tempfile.mkdtemp(prefix="saekit-gpu-check-"))
    print(f"gpu_check: device {a.device}, {'tiny' if a.tiny else 'full'} sizes, budget {a.budget} s, work {work}")
    try:
        results = run_parts(a, work, Path(out) if out else None)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    sys.exit(0 if all(p.get("status") == "ok" for p in results["parts"].values()) else 1)


def run_parts(a: argparse.Namespace, work: Path, out: Path | None) -> dict:
    """Every part in turn, each within what is left of --budget; results (and the log) under `out`."""
    sizes, env = TINY if a.tiny else FULL, child_env(work)
    results: dict[str, Any] = {"device": a.device, "tiny": a.tiny, "argv": sys.argv[1:], "parts": {}}
    deadline = time.monotonic() + a.budget
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with open((out or work) / "gpu_check.log", "w") as log:
        for part in a.parts.split(","):
            limit = int(min(sizes.timeouts[part], deadline - time.monotonic() - 5))
            results["parts"][part] = spawn_part(part, a, work, env, limit, log)
            if out is not None:  # after each part: a call killed later still brings back the parts done
                (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="the device under test (cpu for the dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on a CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from: " + ", ".join(PARTS))
    p.add_argument("--out", default="", help="where gpu_check.json and gpu_check.log go (default: $OUT)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    p.add_argument("--keep", action="store_true", help="keep the work directory (stores, runs)")
    p.add_argument("--part", default="", help=argparse.SUPPRESS)  # internal: run one part here
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    unknown = set(a.parts.split(",")) - set(PARTS) | ({a.part} - set(PARTS) - {""})
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    return a


def child_env(work: Path) -> dict[str, str]:
    """The environment of every process the check starts: output unbuffered, nothing from the
    network, and `saekit.cli` importable. Installed, saekit maps the top-level cli/ to saekit.cli;
    a bare checkout (the GPU machine's copy of the tree) does not, so there `python -m
    saekit.cli.main` gets a package of links: saekit's files plus cli/ as saekit/cli."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env |= {"TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(REPO)]
    if find_spec("saekit.cli") is None:
        pkg = work / "pypath" / "saekit"
        pkg.mkdir(parents=True)
        for item in (REPO / "saekit").iterdir():
            (pkg / item.name).symlink_to(item)
        (pkg / "cli").symlink_to(REPO / "cli")
        paths.insert(0, str(pkg.parent))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def spawn_part(part: str, a: argparse.Namespace, work: Path, env: dict, limit: int, log) -> dict:
    """Run one part in its own process group (torchrun's workers included), its output passed on
    line by line; killed at `limit` seconds. Returns what it saved, with its status."""
    if limit < 10:
        return {"status": "skipped: no time left in --budget"}
    result = work / f"{part}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--device", a.device, "--work", str(work)]
    cmd += ["--tiny"] if a.tiny else []
    print(f"\n== {part} (at most {limit} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    pump = threading.Thread(target=_pass_on, args=(proc.stdout, part, log), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = f"timed out after {limit} s"
    pump.join(timeout=5)
    saved = json.loads(result.read_text()) if result.is_file() else {}
    if status == "ok" and saved.get("errors"):
        status = "failed: " + "; ".join(saved["errors"])
    return saved | {"status": status, "seconds": round(time.monotonic() - t0, 1)}


def _pass_on(stream, part: str, log) -> None:
    for line in stream:
        print(f"[{part}] {line}", end="", flush=True)
        log.write(f"[{part}] {line}")
        log.flush()


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    rows = [("part", "what", "figure", "expected")]
    for part, r in results["parts"].items():
        rows.append((part, "status", f"{r.get('status')} ({r.get('seconds', 0)} s)", "ok"))
        for what, fig, want in TABLE[part](r):
            rows.append(("", what, fig, want))
        rows += [("", "error", e[:100], "") for e in r.get("errors", [])]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    print("\n" + "=" * (sum(widths) + 6))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else "inf" if v == math.inf else format(v, fmt)


def _harvest_rows(r: dict) -> list:
    out = []
    for name in ("dev_bf16", "cpu_fp32", "dev_fp32", "gpt2_small_random_bf16"):
        h = r.get(f"harvest_{name}", {})
        if "tokens_per_s" in h:
            fig = f"{_f(h['tokens_per_s'], ',.0f')} tok/s, /bare {h['harvest_over_bare']:.2f}"
            out.append((f"harvest {name}", fig, "CPU target >=0.9"))
    for name, want in (("bf16_vs_cpu_fp32", "bf16_vs_fp32"), ("dev_fp32_vs_cpu_fp32", "fp32_vs_fp32")):
        p = r.get(f"parity_{name}", {})
        if "rel_err" in p:
            fig = f"{p['rel_err']:.1e} (row max {p['row_rel_max']:.1e})"
            out.append((f"rel err {name}", fig, EXPECT[want]))
            fig = f"bit-equal {p['bitwise_equal_frac']:.4f}, tokens {p['tokens_equal']}"
            out.append(("  same values?", fig, "tokens True"))
            if p.get("content_hash_equal_but_meta") is not None:
                fig = f"{p['content_hash_equal']}; with one meta {p['content_hash_equal_but_meta']}"
                out.append(("  same content hash?", fig, "False (meta names the device)"))
    return out


def _ddp_rows(r: dict) -> list:
    out = []
    for name in ("plain", "torchrun", "cpu"):
        t = r.get(f"train_{name}", {})
        if "seconds" in t:
            fig = f"{t['seconds']:.1f} s end to end, eval fvu {_f(t.get('eval/fvu'), '.4f')}"
            out.append((f"train {name} ({t['device']})", fig, ""))
    for other in ("torchrun", "cpu"):
        c = r.get(f"{other}_vs_plain", {})
        if "weights_max_abs_diff" in c:
            fig = f"|dW| {_f(c['weights_max_abs_diff'], '.1e')}, |dmetric| {_f(c['metrics_max_abs_diff'], '.1e')}"
            out.append(
                (f"{other} vs plain train", fig, EXPECT["same_run"] if other == "torchrun" else "close, not equal")
            )
    st = r.get("train_step", {})
    if "dev_over_cpu" in st:
        fig = f"{st['dev_tokens_per_s']:,.0f} tok/s, cpu {st['cpu_tokens_per_s']:,.0f}"
        out.append(("train step", fig, f"x{st['dev_over_cpu']:.1f} of the CPU"))
    dd = r.get("ddp_one_rank", {})
    if "weights_max_abs_diff" in dd:
        out.append(
            (f"DDP {dd['backend']} 1 rank vs plain", f"|dW| {dd['weights_max_abs_diff']:.1e}", EXPECT["same_run"])
        )
    return out


def _pursuit_rows(r: dict) -> list:
    out = []
    for key, g in r.items():
        if key.startswith("gp_k") and "rows_per_s" in g:
            fig = (
                f"{g['rows_per_s']:,.0f} rows/s, orig/gp {g['original_over_gp']:.2f}, gp/floor {g['gp_over_floor']:.2f}"
            )
            out.append((f"gp {key[3:]}", fig, "orig/gp >=3, gp/floor <=1.3"))
    p = r.get("parity", {})
    if "rows_same_support" in p:
        fig = f"{p['rows_same_support']:.3f} rows, fvu rel {p['fvu_rel_diff']:.1e}"
        out.append(("gp dev vs cpu", fig, EXPECT["pursuit_rows"]))
    return out


def _eval_rows(r: dict) -> list:
    out = []
    if "tokens_per_s" in r.get("eval_dev", {}) and "tokens_per_s" in r.get("eval_cpu", {}):
        fig = f"{r['eval_dev']['tokens_per_s']:,.0f} tok/s, cpu {r['eval_cpu']['tokens_per_s']:,.0f}"
        out.append(("eval", fig, ""))
    p = r.get("parity", {})
    if "ce_max_abs_diff" in p:
        fig = f"|dCE| {p['ce_max_abs_diff']:.1e}, |dKL| {p['kl_mean_max_abs_diff']:.1e}"
        out.append(("eval dev vs cpu", fig, EXPECT["ce_kl"]))
    return out


def _env_rows(r: dict) -> list:
    v = r.get("versions", {})
    fig = f"torch {v.get('torch')}, {v.get('gpu', 'no GPU')}"
    return [("machine", fig, "")]


TABLE = {"env": _env_rows, "harvest": _harvest_rows, "ddp": _ddp_rows, "pursuit": _pursuit_rows, "eval": _eval_rows}


if __name__ == "__main__":
    main()

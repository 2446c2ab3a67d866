"""Amortised encoders against gradient pursuit: how much of the gap each closes, at what cost.

    .venv/bin/python bench/encoders.py                # the demo's cache and SAE (about 20 min on 2 cores)
    .venv/bin/python bench/encoders.py --sweep        # also the MLP encoder's hyperparameter sweep
    .venv/bin/python bench/encoders.py --tiny         # a smoke run (tests/test_bench.py)

Builds (or reuses, in --out) the store and the TopK SAE of `saekit demo`: the embedded model's
residual stream, 200,000 rows, 1024 latents, k 16, 2,000 steps of 512 rows. Against that SAE's
frozen dictionary it trains each amortised encoder with `saekit train --from-pretrained` on the
training rows (distillation reads gradient pursuit's codes of those rows from one `saekit pursue`
run), then measures every encoding on rows that training held out:

- report rows: the held-out rows of the store's last --sequences whole sequences (what the
  figures and the ΔCE/KL of `saekit eval --sequences N` are measured on);
- tuning rows: the held-out rows before them. "Best" (and the --sweep) is chosen on these only,
  so no reported figure is tuned on the rows it is reported on.

For each encoding it prints the FVU; the fraction of the encoder-to-pursuit gap it closes,
(FVU_encoder - FVU) / (FVU_encoder - FVU_gp), everything at the SAE's k; its cost per row in
matmuls of the linear encoder's size (d_in x n_features: `saekit.sae.encoder_cost` for trained
encoders, 1 + T for encoder+gp, k for gp); and its measured time per row as a ratio against the
SAE's own encoder (a linear encoder + TopK), timed in the same run. Then `saekit eval` gives the
same comparison in ΔCE and KL on the report rows' sequences.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saekit import eval as saekit_eval
from saekit import harvest, pursue, train
from saekit.encodings import encoder_codes
from saekit.measure.downstream import sequence_layout
from saekit.measure.gap import format_gaps
from saekit.measure.heldout import sae_held_out
from saekit.metrics import ReconstructionStats
from saekit.pursuit import SparseCodes, pursuit, reconstruct, refine, refit
from saekit.sae import encoder_cost, load_sae
from saekit.store import open_store

Encode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (reconstruction, code values)
DISTILL = 10.0  # the distillation weight (docs/train.md's example)


class Design(NamedTuple):
    """An amortised encoder trained against the frozen dictionary: its `saekit train` flags."""

    name: str
    flags: dict


def designs(d_in: int) -> list[Design]:
    d = {"distill": DISTILL}
    return [
        Design("linear (retrained)", {}),
        Design("linear + distill", d),
        Design(f"mlp {d_in}x1", {"d_hidden": d_in, "n_hidden": 1}),
        Design("mlp 512x2", {"d_hidden": 512, "n_hidden": 2}),
        Design("unrolled T=1", {"unroll": 1}),
        Design("unrolled T=2", {"unroll": 2}),
        Design("unrolled T=2 + distill", {"unroll": 2, **d}),
    ]


def sweep() -> list[Design]:
    """The MLP encoder's sweep, one factor at a time around `mlp 512x2` (1M tokens, skip init)."""
    base = {"d_hidden": 512, "n_hidden": 2}
    return [
        Design("mlp 256x2", {**base, "d_hidden": 256}),
        Design("mlp 512x1", {**base, "n_hidden": 1}),
        Design("mlp 512x3", {**base, "n_hidden": 3}),
        Design("mlp 512x2 lr/3", {**base, "lr_scale": 1 / 3}),
        Design("mlp 512x2 lr*3", {**base, "lr_scale": 3.0}),
        Design("mlp 512x2 tokens*2", {**base, "tokens_scale": 2.0}),
        Design("mlp 512x2 no skip init", {**base, "init_encoder": False}),
        Design("mlp 512x2 + distill", {**base, "distill": DISTILL}),
    ]


class Setup(NamedTuple):
    store: Any
    sae_dir: Path
    report: range  # rows the figures are reported on
    tuning: range  # rows choices are made on
    sequences: int  # whole sequences at the store's end = the report rows
    codes: Path  # gradient pursuit's codes of the training rows (for distillation)


class Measured(NamedTuple):
    fvu: float
    l0: float
    seconds: float


def slug(name: str) -> str:
    for a, b in ((" ", "_"), ("/", "div"), ("*", "x"), ("+", "p"), ("=", ""), ("(", ""), (")", "")):
        name = name.replace(a, b)
    return name


def setup(args, out: Path) -> Setup:
    """The demo's store and SAE (reused when --out already holds them), the rows, and the codes."""
    store_dir = harvest.run(
        harvest.HarvestConfig(out=str(out / "store"), tokens=args.tokens, resume=True, progress=False)
    ).path
    sae_dir = train.run(
        train.TrainConfig(
            store=str(store_dir),
            out=str(out / "sae"),
            n_features=args.n_features,
            k=args.k,
            batch_size=512,
            tokens=args.steps * 512,
            resume=True,
            progress=False,
        )
    ).out
    store = open_store(store_dir)
    held = sae_held_out(store, load_sae(str(sae_dir)), str(sae_dir)).rows
    layout = sequence_layout(store)
    whole = store.n_rows // layout.per_seq  # as `saekit eval --sequences N`: the last N whole sequences
    report = layout.rows(range(whole - args.sequences, whole))
    assert report.start > held.start, "--sequences reaches into the training rows: lower it"
    codes = pursue.run(
        pursue.PursueConfig(
            store=str(store_dir),
            sae=str(sae_dir),
            out=str(out / "train_codes"),
            k=[args.k],
            methods=["gp"],
            start_row=0,
            rows=held.start,
            resume=True,
            progress=False,
        )
    ).out
    return Setup(store, sae_dir, report, range(held.start, report.start), args.sequences, codes)


def train_design(args, s: Setup, sae_dir: Path, out: Path, d: Design, codes: Path | None) -> Path:
    flags = dict(d.flags)
    lr_scale = flags.pop("lr_scale", 1.0)
    tokens = int(args.enc_tokens * flags.pop("tokens_scale", 1.0))
    flags.setdefault("init_encoder", True)
    if lr_scale != 1.0:  # the default learning rate, as the unscaled run resolved it
        flags["lr"] = train.read_run_config(out.parent / "mlp_512x2")["lr"] * lr_scale
    if flags.get("distill") and codes is not None:
        flags["distill_codes"] = str(codes)
    cfg = train.TrainConfig(
        store=str(s.store.path),
        out=str(out),
        from_pretrained=str(sae_dir),
        k=args.k,
        tokens=tokens,
        batch_size=512,
        resume=True,
        progress=False,
        **flags,
    )
    return train.run(cfg).out


@torch.no_grad()
def measure(encode: Encode, x: torch.Tensor, batch: int = 2048) -> Measured:
    stats, seconds = ReconstructionStats(), 0.0
    for b0 in range(0, x.shape[0], batch):
        xb = x[b0 : b0 + batch]
        t0 = time.perf_counter()
        recon, values = encode(xb)
        seconds += time.perf_counter() - t0
        stats.update(xb, recon, values)
    r = stats.compute()
    return Measured(r.fvu, r.l0, seconds)


def sae_encoding(sae) -> Encode:
    def encode(x):
        out = sae(x)
        return out.reconstruction, out.codes

    return encode


def code_encoding(fn: Callable[[torch.Tensor], SparseCodes], W, b) -> Encode:
    def encode(x):
        c = fn(x)
        return reconstruct(c, W, b), c.values

    return encode


def inference_encodings(sae, k: int, refine_steps: list[int]) -> list[tuple[str, float, Encode]]:
    """The SAE's encoder, refit, encoder+gp at each T, and gp, against its (raw-space) dictionary."""
    W, b = (t.detach().float() for t in sae.decoder.raw_dictionary())
    cost = encoder_cost(sae)
    out = [("encoder", cost, sae_encoding(sae))]
    out.append(("refit", cost, code_encoding(lambda x: refit(x, W, encoder_codes(sae, x, k), b_dec=b), W, b)))
    for t in refine_steps:
        fn = lambda x, t=t: refine(x, W, encoder_codes(sae, x, k), t, b_dec=b)  # noqa: E731
        out.append((f"encoder+gp T={t}", cost + t, code_encoding(fn, W, b)))
    out.append((f"gp k={k}", float(k), code_encoding(lambda x: pursuit(x, W, k, b_dec=b, dense=False), W, b)))
    return out


def closed(m: Measured, enc: Measured, gp: Measured) -> float:
    return (enc.fvu - m.fvu) / (enc.fvu - gp.fvu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/encoders", help="work directory (reused: finished runs are kept)")
    p.add_argument("--tokens", type=int, default=200_000, help="rows harvested (the demo's)")
    p.add_argument("--n-features", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000, help="the SAE's training steps (batch 512)")
    p.add_argument("--enc-tokens", type=int, default=1_000_000, help="rows each amortised encoder trains on")
    p.add_argument("--sequences", type=int, default=64, help="report rows: the store's last N whole sequences")
    p.add_argument("--refine", type=int, nargs="*", default=[1, 2, 3], help="encoder+gp steps T to show")
    p.add_argument("--sweep", action="store_true", help="also sweep the MLP encoder's hyperparameters")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.tokens, args.n_features, args.k, args.steps, args.enc_tokens, args.sequences = 20_000, 256, 8, 40, 8192, 4
    out = Path(args.out)
    s = setup(args, out)
    sae = load_sae(str(s.sae_dir)).eval()
    hook = s.store.resolve_hook(None)
    report = s.store.rows(hook, s.report.start, s.report.stop).float()
    tuning = s.store.rows(hook, s.tuning.start, s.tuning.stop).float()
    k = args.k
    print(
        f"store {s.store.n_rows:,} rows x d {sae.d_in}; SAE {sae.n_features} latents, TopK k {k}; "
        f"report rows {s.report.start}..{s.report.stop - 1} ({args.sequences} sequences), "
        f"tuning rows {s.tuning.start}..{s.tuning.stop - 1}; each encoder trained on {args.enc_tokens:,} rows",
        flush=True,
    )
    rows = inference_encodings(sae, k, args.refine)
    trained: dict[str, Path] = {}
    for d in designs(sae.d_in) + (sweep() if args.sweep else []):
        t0 = time.perf_counter()
        trained[d.name] = train_design(args, s, s.sae_dir, out / "enc" / slug(d.name), d, s.codes)
        enc = load_sae(str(trained[d.name])).eval()
        rows.append((d.name, encoder_cost(enc), sae_encoding(enc)))
        print(f"  trained {d.name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = {name: (cost, measure(fn, report), measure(fn, tuning)) for name, cost, fn in rows}
    _, enc, enc_t = results["encoder"]
    _, gp, gp_t = results[f"gp k={k}"]
    print("\n| encoding | matmuls/row | L0 | FVU | gap closed | gap closed (tuning rows) | time ÷ encoder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (cost, rep, tun) in results.items():
        print(
            f"| {name} | {cost:.2f} | {rep.l0:.2f} | {rep.fvu:.4f} | {closed(rep, enc, gp):.1%} | "
            f"{closed(tun, enc_t, gp_t):.1%} | {rep.seconds / enc.seconds:.2f} |"
        )
    cheap = {n: v for n, v in results.items() if n in trained and v[0] <= 3.0}
    best = max(cheap, key=lambda n: closed(cheap[n][2], enc_t, gp_t))  # chosen on the tuning rows only
    cost, rep, _ = cheap[best]
    print(
        f"\nbest amortised encoder costing <= 3 linear-encoder matmuls per row (chosen on the tuning rows): {best}\n"
        f"gap closed = {closed(rep, enc, gp):.1%} of the TopK encoder -> gp FVU gap on the report rows (target >= 50%)\n"
        f"cost ratio = {cost:.2f} linear-encoder matmuls per row; measured time ÷ the SAE's encoder = {rep.seconds / enc.seconds:.2f}",
        flush=True,
    )
    downstream = evaluate(args, s, trained, out)
    summary = {
        "best": best,
        "report_rows": [s.report.start, s.report.stop],
        "tuning_rows": [s.tuning.start, s.tuning.stop],
        "rows": {
            n: {"cost_matmuls": c, "report": r._asdict(), "tuning": t._asdict(), "gap_closed": closed(r, enc, gp)}
            for n, (c, r, t) in results.items()
        },
        "downstream": downstream,
    }
    (out / "encoders.json").write_text(json.dumps(summary, indent=1))


def evaluate(args, s: Setup, trained: dict[str, Path], out: Path) -> dict:
    """`saekit eval` on the report rows' sequences: ΔCE and KL of every encoding above."""
    shutil.rmtree(out / "eval", ignore_errors=True)  # this script's own report of an earlier run
    res = saekit_eval.run(
        saekit_eval.EvalConfig(
            store=str(s.store.path),
            sae=str(s.sae_dir),
            out=str(out / "eval"),
            encoders=[str(p) for p in trained.values()],
            k=[args.k],
            methods=["gp", "refit", "encoder+gp"],
            refine=2,
            sequences=s.sequences,
            progress=False,
        )
    )
    print(f"\nthe encoder's gap to gp, decomposed (encoder+gp: T=2; `saekit eval`):\n{format_gaps(res.gaps)}")
    names = {str(p): n for n, p in trained.items()}
    print("\nspliced into the model, on the same rows' sequences (`saekit eval`):")
    print("| encoding | ΔCE (nats/token) | KL mean | FVU |\n|---|---:|---:|---:|")
    table = {}
    for e in res.entries:
        name = names.get(e.source, e.method) if e.method.startswith("encoder:") else e.method
        if e.method in ("clean", "zero", "mean") or e.metrics.delta_ce is None:
            continue
        table[name] = {"delta_ce": e.metrics.delta_ce, "kl_mean": e.metrics.kl_mean, "fvu": e.metrics.fvu}
        print(f"| {name} | {e.metrics.delta_ce:.4f} | {e.metrics.kl_mean:.4f} | {e.metrics.fvu:.4f} |")
    return table


if __name__ == "__main__":
    main()

"""The ground-truth study: do pursuit codes, or a pursuit-trained dictionary, find the true features?

    .venv/bin/python bench/truth.py                        # cpu preset, 3 seeds (about an hour on 2 cores)
    .venv/bin/python bench/truth.py --seeds 5 --tokens 4000000
    .venv/bin/python bench/truth.py --tiny          # smoke: a 64-feature model, 2 seeds, a minute

For each seed s (another draw of the synthetic model and its rows, and another training seed), on
the rows of `saekit harvest --model synthetic:PRESET --seed s`, at one matched L0 (--k, the preset's
mean true L0 by default):

    topk          `saekit train` TopK SAE
    batchtopk     `saekit train --activation batchtopk`
    topk-const    the TopK SAE at sae-lens's schedule (a constant lr: `--warmup-frac 0 --decay-frac 0`),
                  to compare with sae-lens's trainer like for like
    pursuit-dict  `saekit train --from-pretrained <topk> --codes pursuit --tokens <--pursuit-tokens>`:
                  the TopK dictionary trained on under gradient-pursuit codes (a step costs about
                  30 encoder steps on a CPU, so it refines the TopK dictionary rather than start
                  afresh)
    topk-more     the control: the TopK SAE trained on for the same rows under its own encoder's
                  codes (`--from-pretrained <topk> --init-encoder --train-decoder`)
    sae-lens      the cross-check: sae-lens's own TopK SAE and trainer (`SAETrainer`, as
                  `sae_lens.synthetic.train_toy_sae` sets it up) on the same training rows and
                  budget; its MCC by sae-lens's `mean_correlation_coefficient`
    true          the upper reference: a sae-lens TopK SAE set to the true dictionary by
                  `sae_lens.synthetic.initialization.init_sae_to_match_feature_dict`

and on each dictionary `saekit pursue --k K --method gp --method omp` on the store's held-out rows
(never trained on) measures every encoding's FVU and recovery. Every figure is printed as mean ±
95% CI over seeds (`saekit.measure.noise`), and each comparison as a per-seed paired difference:
one whose CI covers zero is "within noise". The baselines are the SAE's own encoder (for codes on a
dictionary) and the TopK SAE (for a dictionary).

Each step writes into --work/seed<s>/ and is skipped when it finished before, so a stopped study
resumes. The table, a JSON of every per-seed figure and one plot land in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from saekit.measure.heldout import held_out_rows
from saekit.measure.noise import Estimate
from saekit.store import open_store

SAEKIT = str(Path(sys.executable).parent / "saekit")
TINY_MODEL = {  # a sae-lens SyntheticModelConfig small enough for a smoke run (as tests/test_synthetic.py's)
    "num_features": 64,
    "hidden_dim": 16,
    "firing_probability": {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.3, "min_prob": 0.02},
    "std_firing_magnitudes": 0.3,
    "seed": 3,
}
TINY_ARGS = dict(seeds=2, rows=5000, tokens=20000, pursuit_tokens=5000, n_features=64, k=4, batch_size=256)
DICTIONARIES = {
    "topk": ["--activation", "topk"],
    "batchtopk": ["--activation", "batchtopk"],
    "topk-const": ["--activation", "topk", "--warmup-frac", "0", "--decay-frac", "0"],
}
FIGURES = {
    "fvu": "FVU",
    "mcc": "MCC",
    "matched_09": "found",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "shrinkage": "shrinkage",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def step(done: Path, out: Path, what: str, run) -> float:
    """Run `run()` (which writes `out`) unless `done` says it finished before; its seconds, or 0."""
    if done.exists():
        return 0.0
    if out.exists():
        shutil.rmtree(out)  # a step stopped half-way: its output is incomplete
    log(what)
    t0 = time.perf_counter()
    run()
    done.write_text("done\n")
    return time.perf_counter() - t0


def saekit(*args: object) -> None:
    subprocess.run([SAEKIT, *map(str, args), "--no-progress"], check=True)


def train_sae_lens(store: Path, out: Path, a: argparse.Namespace, seed: int) -> None:
    """sae-lens's TopK SAE trained by sae-lens's `SAETrainer`, set up as `sae_lens.synthetic.
    train_toy_sae` sets it up, on the store's training rows (not the held-out ones) for the same
    budget and batch as `saekit train`; saved with sae-lens's own `save_inference_model`."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    st = open_store(store)
    x = st.rows(None, 0, held_out_rows(st.n_rows).start).float()
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a.n_features, k=a.k, dtype="float32"))

    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - a.batch_size + 1, a.batch_size):
                yield x[perm[i : i + a.batch_size]]

    cfg = SAETrainerConfig(  # train_toy_sae's settings, with saekit train's budget, batch and lr
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=a.tokens,
        device="cpu",
        autocast=False,
        lr=a.lr,
        lr_end=a.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=0,
        n_restart_cycles=1,
        train_batch_size_samples=a.batch_size,
        dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches(), save_checkpoint_fn=lambda _: None).fit()
    sae.save_inference_model(out)


def true_sae(store: Path, out: Path, k: int) -> None:
    """A sae-lens TopK SAE holding the true dictionary (sae-lens's `init_sae_to_match_feature_dict`)
    and the synthetic model's bias as its decoder bias."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.synthetic.initialization import init_sae_to_match_feature_dict

    truth = open_store(store).truth_features()
    n, d = truth["features"].shape
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32"))
    init_sae_to_match_feature_dict(sae, SimpleNamespace(feature_vectors=truth["features"]))
    with torch.no_grad():
        sae.b_dec.copy_(truth["bias"])
        sae.W_dec.data = sae.W_dec.data.contiguous()  # the initializer leaves a transposed view
    sae.save_model(out)


def sae_lens_mcc(sae_dir: Path, store: Path) -> float:
    """sae-lens's own MCC of a saved sae-lens SAE against the store's true features."""
    from sae_lens import SAE
    from sae_lens.synthetic.evals import mean_correlation_coefficient

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    return float(mean_correlation_coefficient(sae.W_dec.detach(), open_store(store).truth_features()["features"]))


def run_seed(a: argparse.Namespace, seed: int) -> dict:
    """Every dictionary and encoding of one seed: {dictionary: {encoding: {figure: value}}}."""
    w = a.work / f"seed{seed}"
    w.mkdir(parents=True, exist_ok=True)
    store, secs = w / "syn", {}
    model = f"synthetic:{a.preset}"
    secs["harvest"] = step(
        w / ".harvest",
        store,
        f"seed {seed}: harvest {a.rows:,} rows of {model}",
        lambda: saekit("harvest", "--model", model, "--seed", seed, "--tokens", a.rows, "--out", store),
    )
    sae_dirs: dict[str, Path] = {}
    for name, flags in DICTIONARIES.items():
        run = sae_dirs[name] = w / name
        args = ["--store", store, "--out", run, "--n-features", a.n_features, "--k", a.k, "--seed", seed]
        args += ["--tokens", a.tokens, "--batch-size", a.batch_size, "--lr", a.lr, *flags]
        secs[name] = step(w / f".{name}", run, f"seed {seed}: train {name}", lambda args=args: saekit("train", *args))
    # Both go on from the TopK SAE for the same rows, one under pursuit codes, one under its own
    # encoder's: the second is the control, so a difference is the codes', not the extra training.
    more = ["--codes", "encoder", "--init-encoder", "--train-decoder"]
    for name, flags, what in (
        ("pursuit-dict", ["--codes", "pursuit"], "train the TopK dictionary on under pursuit codes"),
        ("topk-more", more, "train the TopK SAE on as it was (the control)"),
    ):
        run = sae_dirs[name] = w / name
        args = ["--store", store, "--out", run, "--from-pretrained", w / "topk", "--k", a.k, "--seed", seed]
        args += ["--tokens", a.pursuit_tokens, "--batch-size", a.batch_size, "--lr", a.lr, *flags]
        secs[name] = step(w / f".{name}", run, f"seed {seed}: {what}", lambda args=args: saekit("train", *args))
    sae_dirs["sae-lens"] = w / "sae-lens"
    secs["sae-lens"] = step(
        w / ".sae-lens",
        w / "sae-lens",
        f"seed {seed}: train sae-lens's TopK SAE",
        lambda: train_sae_lens(store, w / "sae-lens", a, seed),
    )
    sae_dirs["true"] = w / "true"
    step(w / ".true", w / "true", f"seed {seed}: the true dictionary", lambda: true_sae(store, w / "true", a.k))
    figures: dict = {"seconds": secs, "sae_lens_mcc": sae_lens_mcc(w / "sae-lens", store)}
    for name, sae in sae_dirs.items():
        p = w / f"pursue-{name}"
        step(
            w / f".pursue-{name}",
            p,
            f"seed {seed}: pursue on {name}",
            lambda p=p, sae=sae: saekit(
                "pursue",
                "--store",
                store,
                "--sae",
                sae,
                "--k",
                a.k,
                *(f for m in a.methods for f in ("--method", m)),
                "--out",
                p,
            ),
        )
        figures[name] = {
            _encoding(e["method"]): {
                "fvu": e["fvu"],
                "stale": e["method"] not in ("encoder", *a.methods),
                **e["recovery"],
            }
            for e in json.loads((p / "report.json").read_text())
        }
    (w / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def _encoding(method: str) -> str:
    return "encoder" if method.startswith("encoder") else method


def aggregate(per_seed: list[dict], methods: list[str]) -> tuple[list[dict], list[str]]:
    """Rows of the study's table (mean ± CI over seeds), and its printed lines."""
    rows, lines = [], []
    head = "| dictionary | encoding | " + " | ".join(FIGURES.values()) + " | FVU gain | ΔF1 |"
    lines += [head, "|---|---|" + "---:|" * (len(FIGURES) + 2)]
    dicts = [d for d in per_seed[0] if isinstance(per_seed[0][d], dict) and d != "seconds"]
    for d in dicts:
        for enc in ["encoder", *methods]:
            vals = {f: Estimate.of([s[d][enc][f] for s in per_seed]) for f in FIGURES}
            gain = df1 = None
            if enc != "encoder":
                gain = Estimate.of([s[d]["encoder"]["fvu"] - s[d][enc]["fvu"] for s in per_seed])
                df1 = Estimate.of([s[d][enc]["f1"] - s[d]["encoder"]["f1"] for s in per_seed])
            rows.append(
                {
                    "dictionary": d,
                    "encoding": enc,
                    **{f: v.as_json() for f, v in vals.items()},
                    "fvu_gain": gain and gain.as_json(),
                    "f1_change": df1 and df1.as_json(),
                }
            )
            cells = [vals[f].fmt() for f in FIGURES]
            extra = [gain.fmt_difference() if gain else "", df1.fmt_difference() if df1 else ""]
            label = enc + (" (stale)" if per_seed[0][d][enc]["stale"] else "")
            lines.append(f"| {d} | {label} | " + " | ".join(cells + extra) + " |")
    lines += ["", "Dictionaries against saekit's TopK SAE (paired by seed; F1 of gp codes at k on each):", ""]
    for d in dicts:
        if d == "pursuit-dict" and "topk-more" in dicts:
            dm = Estimate.of([s[d]["encoder"]["mcc"] - s["topk-more"]["encoder"]["mcc"] for s in per_seed])
            dg = Estimate.of([s[d][methods[0]]["f1"] - s["topk-more"][methods[0]]["f1"] for s in per_seed])
            lines.append(
                f"- pursuit-dict against topk-more (the same extra rows): ΔMCC {dm.fmt_difference()}; "
                f"Δ{methods[0]} F1 {dg.fmt_difference()}"
            )
        if d != "topk":
            dm = Estimate.of([s[d]["encoder"]["mcc"] - s["topk"]["encoder"]["mcc"] for s in per_seed])
            dg = Estimate.of([s[d][methods[0]]["f1"] - s["topk"][methods[0]]["f1"] for s in per_seed])
            lines.append(f"- {d}: ΔMCC {dm.fmt_difference()}; Δ{methods[0]} F1 {dg.fmt_difference()}")
    lens = Estimate.of([s["sae_lens_mcc"] for s in per_seed])
    mine = Estimate.of([s["topk"]["encoder"]["mcc"] for s in per_seed])
    diff = [abs(s["sae-lens"]["encoder"]["mcc"] - s["sae_lens_mcc"]) for s in per_seed]
    lines += [
        "",
        f"Cross-check: sae-lens's TopK SAE, MCC by sae-lens's evals {lens.fmt()}; saekit's TopK SAE {mine.fmt()}",
    ]
    if "topk-const" in dicts:
        const = Estimate.of([s["topk-const"]["encoder"]["mcc"] for s in per_seed])
        paired = Estimate.of([s["topk-const"]["encoder"]["mcc"] - s["sae_lens_mcc"] for s in per_seed])
        lines.append(
            f"at sae-lens's constant lr {const.fmt()}; saekit (constant lr) minus sae-lens {paired.fmt_difference()}"
        )
    lines.append(f"saekit's MCC of the sae-lens SAE minus sae-lens's own: max |Δ| {max(diff):.1e}.")
    return rows, lines


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"encoder": "o", "gp": "s", "omp": "^", "mp": "v", "cgp": "D"}
    for i, d in enumerate(dict.fromkeys(r["dictionary"] for r in rows)):
        for r in (r for r in rows if r["dictionary"] == d):
            ax.errorbar(
                r["fvu"]["mean"],
                r["f1"]["mean"],
                xerr=r["fvu"]["ci95"] or 0,
                yerr=r["f1"]["ci95"] or 0,
                marker=markers.get(r["encoding"], "x"),
                color=f"C{i}",
                capsize=2,
                linestyle="none",
                label=f"{d} / {r['encoding']}",
            )
    ax.set_xlabel("FVU on held-out rows (lower is better)")
    ax.set_ylabel("support F1 against the true features")
    ax.set_title("Reconstruction against truth, mean ± 95% CI over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: draws of the model and training seeds")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--rows", type=int, default=200_000, help="rows harvested per seed (a tenth held out)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training budget of every SAE, in rows")
    p.add_argument("--n-features", type=int, default=4096)
    p.add_argument("--k", type=int, default=16, help="the matched L0 (the cpu preset's true mean L0 is 16)")
    p.add_argument("--pursuit-tokens", type=int, default=200_000, help="rows pursuit-dict trains on after TopK")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3, help="every SAE's Adam lr (1e-3 beat 4e-4 on MCC here)")
    p.add_argument("--method", dest="methods", action="append", default=None, help="pursuit methods (gp, omp)")
    p.add_argument("--work", type=Path, default=Path("bench/out/truth"), help="where the runs go (resumable)")
    p.add_argument("--out", type=Path, default=None, help="table, JSON and plot; default: --work")
    p.add_argument("--tiny", action="store_true", help="smoke run: a 64-feature model in 16 dims, 2 seeds")
    a = p.parse_args()
    if a.tiny:
        vars(a).update(TINY_ARGS)
        a.work.mkdir(parents=True, exist_ok=True)
        a.preset = str((a.work / "tiny.json").resolve())
        Path(a.preset).write_text(json.dumps(TINY_MODEL))
    a.methods = a.methods or ["gp", "omp"]
    a.out = a.out or a.work
    a.work.mkdir(parents=True, exist_ok=True)
    per_seed = [run_seed(a, s) for s in range(a.seeds)]
    rows, lines = aggregate(per_seed, a.methods)
    a.out.mkdir(parents=True, exist_ok=True)
    secs = {k: Estimate.of([s["seconds"][k] for s in per_seed]).mean for k in per_seed[0]["seconds"]}
    setup = {k: v for k, v in vars(a).items() if k not in ("work", "out")}
    (a.out / "truth.json").write_text(
        json.dumps({"setup": setup, "rows": rows, "per_seed": per_seed, "mean_seconds": secs}, indent=1)
    )
    (a.out / "truth.md").write_text("\n".join(lines) + "\n")
    plot(rows, a.out / "truth_fvu_f1.png")
    print(f"\n{a.seeds} seeds, {a.preset} preset, {a.rows:,} rows, {a.tokens:,} training rows, k {a.k}:\n")
    print("\n".join(lines))
    print(f"\nseconds per seed (mean): {', '.join(f'{k} {v:.0f}' for k, v in secs.items())}")
    print(f"wrote {a.out / 'truth.md'}, {a.out / 'truth.json'}, {a.out / 'truth_fvu_f1.png'}")


if __name__ == "__main__":
    main()

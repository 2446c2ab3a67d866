"""Downstream evaluation speed against SAELens's own evaluation code: same SAE, tokens, batches, device.

    python bench/eval.py [--models embedded,gpt2-small-random] [--sequences N] [--batch-size B]
                         [--repeat R] [--threads T]

For each model, at its hook (`blocks.L.hook_resid_pre`, as bench/harvest.py picks it), with one
TopK SAE (k 32, 8 x d_model latents; random weights: speed does not depend on them):
  sae_lens  `sae_lens.evals.get_recons_loss` on every batch (clean, SAE spliced, zero ablation:
            three full forward passes) and the per-token means that
            `get_downstream_reconstruction_metrics` takes of them. The SAE is the saekit one
            exported to sae-lens format and loaded by sae-lens.
  saekit    `saekit.measure.downstream.downstream_metrics` on the same numbers (SAELens's convention,
            splice_from=0): the clean pass once, the SAE and the zero ablation from the hook on
            (`start_at_layer`), sharing the clean logits.
  forward   one full forward pass (logits) over the same batches.
  extra     one more encoding: the time `downstream_metrics` spends on the SAE's row (encoding,
            spliced pass, CE/KL), and on an identity reconstruction's row (the splice alone),
            against its clean pass (a full forward with the hook, and the clean CE), batch by batch.
Prints sae_lens / saekit (target >= 1.5), extra encoding / clean pass (target <= layers after the
hook / all layers + 0.1), and the largest CE difference between the two implementations.
Timings are best of --repeat interleaved runs (the machine may be shared and noisy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvest import best_interleaved, load  # noqa: E402  (bench/harvest.py: the same models and hooks)

from saekit import texts  # noqa: E402
from saekit.measure.downstream import CLEAN, ZERO, downstream_metrics  # noqa: E402
from saekit.sae import SparseAutoencoder  # noqa: E402


def sae_lens_eval(sl, model, hook: str, batches: list[torch.Tensor]) -> dict[str, float]:
    """What `get_downstream_reconstruction_metrics` does, on our batches (it reads its own store)."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    parts: dict[str, list] = {}
    with torch.no_grad():
        for b in batches:
            for name, v in get_recons_loss(
                sl, model, ActivationScaler(), b, compute_kl=True, compute_ce_loss=True, hook_name=hook
            ).items():
                parts.setdefault(name, []).append(v)
    return {name: torch.cat(v).mean().item() for name, v in parts.items()}


def bench_model(name: str, n_seq: int, ctx_len: int, batch: int, repeat: int, tmp: Path) -> dict:
    import sae_lens

    lm, hook = load(name)
    model, layer = lm.model, int(hook.split(".")[1])
    tokens = torch.tensor([s for _, s in zip(range(n_seq), texts.sequences(model, texts.load_texts(None), ctx_len))])
    batches = list(tokens.split(batch))
    d = model.cfg.d_model
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=d, n_features=8 * d, k=32).eval()
    sae.export_sae_lens(tmp / f"{name}-sae")
    sl = sae_lens.SAE.load_from_disk(str(tmp / f"{name}-sae"))
    results = {}

    def ours(encodings: dict | None = None, key: str = "saekit"):
        encodings = {"sae": sae} if encodings is None else encodings
        results.setdefault(key, []).append(
            downstream_metrics(model, tokens, hook, encodings, splice_from=0, batch_size=batch)
        )

    def theirs():
        results["sae_lens"] = sae_lens_eval(sl, model, hook, batches)

    def forward():
        with torch.inference_mode():
            for b in batches:
                model(b)

    forward()  # warm-up: first-call allocations and kernel selection
    rows = lambda: ours({"sae": sae, "same": lambda x: x}, "rows")
    t_lens, t_ours, t_fwd, _ = best_interleaved([theirs, ours, forward, rows], repeat)
    mine, lens = results["saekit"][0], results["sae_lens"]
    # Each row's own time, summed over the same batches as the clean pass (so a load spike hits
    # them alike); best of the repeats.
    clean, per_encoding, per_splice = (min(r[name].seconds for r in results["rows"]) for name in (CLEAN, "sae", "same"))
    diff = max(
        abs(mine[CLEAN].ce - lens["ce_loss_without_sae"]),
        abs(mine["sae"].ce - lens["ce_loss_with_sae"]),
        abs(mine[ZERO].ce - lens["ce_loss_with_ablation"]),
    )
    return {
        "model": name,
        "hook": hook,
        "tokens": tokens.numel(),
        "sae_lens": t_lens,
        "saekit": t_ours,
        "forward": t_fwd,
        "clean": clean,
        "per_encoding": per_encoding,
        "per_splice": per_splice,
        "after": (model.cfg.n_layers - layer) / model.cfg.n_layers,
        "ce_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="embedded,gpt2-small-random")
    ap.add_argument(
        "--sequences", type=int, default=0, help="sequences per measurement (0: 256 embedded, 16 gpt2-small)"
    )
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass, for both implementations")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ctx_len {args.ctx_len}, "
        f"batch {args.batch_size} sequences, best of {args.repeat}"
    )
    with tempfile.TemporaryDirectory(prefix="saekit-bench-") as tmp:
        for name in args.models.split(","):
            n_seq = args.sequences or (256 if name == "embedded" else 16)
            r = bench_model(name, n_seq, args.ctx_len, args.batch_size, args.repeat, Path(tmp))
            target = r["after"] + 0.1
            print(f"\n{r['model']} ({r['hook']}, {r['tokens']:,} tokens; clean, SAE and zero-ablation CE and KL)")
            print(f"  sae_lens get_recons_loss  {r['sae_lens']:8.3f} s")
            print(
                f"  saekit downstream         {r['saekit']:8.3f} s   sae_lens / saekit = {r['sae_lens'] / r['saekit']:.2f} (target >= 1.5)"
            )
            print(
                f"  one full forward          {r['forward']:8.3f} s   (the clean pass, with its hook and reduction: {r['clean']:.3f} s)"
            )
            print(
                f"  per extra encoding        {r['per_encoding']:8.3f} s   extra / clean pass = {r['per_encoding'] / r['clean']:.2f} "
                f"(target <= {target:.2f}: {r['after']:.2f} of the layers follow the hook, + 0.1)"
            )
            print(
                f"    of which the splice     {r['per_splice']:8.3f} s   splice / clean pass = {r['per_splice'] / r['clean']:.2f} "
                "(an identity reconstruction: the rerun from the hook and the CE/KL reduction, no encoder)"
            )
            print(f"  largest |CE saekit - CE sae_lens| = {r['ce_diff']:.2e} nats")


if __name__ == "__main__":
    main()

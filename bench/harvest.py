"""Harvest throughput against baselines measured in the same run, same tokens, same batch size.

    python bench/harvest.py [--models embedded,gpt2-small-random] [--tokens N] [--threads T]

For each model, with the hook `blocks.{L}.hook_resid_pre`:
  bare    the model's forward pass only as far as the hook needs (stop_at_layer=L), over
          pre-tokenized batches, nothing stored: the ceiling for harvest.
  harvest `saekit.harvest.run_loaded`: tokenize + pack + forward + bf16 + shard writes + finalize.
  naive   the usual approach: full `run_with_cache` (every hook, all layers, logits), then
          `torch.save` of the hook's activations per batch.
Prints rows/s of each and the ratios harvest/bare (target >= 0.9) and harvest/naive, plus bytes
per row on disk. Also the cost of the weights fingerprint (`models.weights_fingerprint`, which
reads every byte of every parameter, once per model load) against a memcpy of the same bytes.
Timings are best of --repeat runs (the machine may be shared and noisy).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit import embedded, models, texts  # noqa: E402
from saekit.harvest import HarvestConfig, run_loaded  # noqa: E402


def gpt2_small_random(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """GPT-2 small's shape (12 x 768, 12 heads, 50257 vocab) with random weights, byte tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        n_ctx=1024,
        d_vocab=50257,
        act_fn="gelu_new",
        normalization_type="LNPre",
        model_name="gpt2-small-random",
        seed=0,
        default_prepend_bos=True,
        device=device,
        dtype=dtype,
    )
    with models._quiet():
        model = HookedTransformer(cfg, tokenizer=embedded.load_embedded_tokenizer())
    return models.describe_model(model.eval(), "gpt2-small-random", {"source": "bench"})


def load(name: str) -> tuple[models.LoadedModel, str]:
    if name == "embedded":
        return models.load_model(None, torch.device("cpu"), torch.float32), "blocks.2.hook_resid_pre"
    if name == "gpt2-small-random":
        return gpt2_small_random(), "blocks.8.hook_resid_pre"
    raise SystemExit(f"unknown bench model {name}")


def best_interleaved(fns: list, repeat: int) -> list[float]:
    """Best time of each function, running them in turn `repeat` times so that load from other
    processes on a shared machine hits all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def bench_model(name: str, tokens: int, ctx_len: int, batch: int, repeat: int, tmp: Path, shard_rows: int) -> dict:
    lm, hook = load(name)
    model = lm.model
    corpus = texts.load_texts(None)  # the embedded corpus
    layer = int(hook.split(".")[1])
    per_seq = ctx_len - 1
    n_seq = -(-tokens // per_seq)
    seqs = torch.tensor([s for _, s in zip(range(n_seq), texts.sequences(model, corpus, ctx_len))])
    batches = seqs.split(batch)

    def bare():
        with torch.inference_mode():
            for b in batches:
                model(b, stop_at_layer=layer)  # returns resid_pre of block `layer` itself

    def harvest():
        out = tmp / f"{name}-store"
        cfg = HarvestConfig(
            hooks=[hook],
            out=str(out),
            tokens=tokens,
            ctx_len=ctx_len,
            batch_size=batch,
            overwrite=True,
            progress=False,
            shard_rows=shard_rows,
            chunk_rows=min(4096, shard_rows),
        )
        run_loaded(cfg, lm, corpus)

    def naive():
        d = tmp / f"{name}-naive"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        with torch.inference_mode():
            for i, b in enumerate(batches):
                _, cache = model.run_with_cache(b)
                torch.save(cache[hook][:, 1:].reshape(-1, model.cfg.d_model).clone(), d / f"acts_{i}.pt")

    params = [p.detach() for p in model.parameters()]

    def fingerprint():
        models.weights_fingerprint(model)

    def memcpy():  # the baseline: every byte of the weights read (and written) once
        for p in params:
            p.clone()

    bare()  # warm-up: first-call allocations and kernel selection
    t_bare, t_harvest, t_naive = best_interleaved([bare, harvest, naive], repeat)
    t_fp, t_copy = best_interleaved([fingerprint, memcpy], max(repeat, 3))
    rows = n_seq * per_seq
    from saekit.store import open_store

    store = open_store(tmp / f"{name}-store")
    naive_bytes = sum(p.stat().st_size for p in (tmp / f"{name}-naive").iterdir())
    return {
        "model": name,
        "hook": hook,
        "rows": store.n_rows,
        "bare_rows_s": rows / t_bare,
        "harvest_rows_s": store.n_rows / t_harvest,
        "naive_rows_s": rows / t_naive,
        "bytes_per_row": store.size_on_disk() / store.n_rows,
        "naive_bytes_per_row": naive_bytes / rows,
        "d_model": model.cfg.d_model,
        "weights_mb": sum(p.numel() * p.element_size() for p in params) / 1e6,
        "fingerprint_s": t_fp,
        "memcpy_s": t_copy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="embedded,gpt2-small-random")
    ap.add_argument("--tokens", type=int, default=0, help="rows per measurement (0: 98,304 embedded, 8,192 gpt2-small)")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ctx_len {args.ctx_len}, "
        f"batch {args.batch_size} sequences, best of {args.repeat}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-"))
    try:
        for name in args.models.split(","):
            tokens = args.tokens or (98_304 if name == "embedded" else 8_192)
            # whole shards only, so bytes/row shows the steady state (a store's last shard is
            # written whole, padding included)
            shard_rows = 16_384 if tokens % 16_384 == 0 else 4_096 if tokens % 4_096 == 0 else 65_536
            r = bench_model(name, tokens, args.ctx_len, args.batch_size, args.repeat, tmp, shard_rows)
            print(f"\n{r['model']} ({r['hook']}, {r['rows']:,} rows, d_model {r['d_model']})")
            print(f"  bare forward   {r['bare_rows_s']:>10,.0f} rows/s")
            print(
                f"  harvest        {r['harvest_rows_s']:>10,.0f} rows/s   harvest/bare  = {r['harvest_rows_s'] / r['bare_rows_s']:.2f}"
            )
            print(
                f"  naive          {r['naive_rows_s']:>10,.0f} rows/s   harvest/naive = {r['harvest_rows_s'] / r['naive_rows_s']:.2f}"
            )
            print(
                f"  disk           {r['bytes_per_row']:.1f} bytes/row (bf16 payload {2 * r['d_model']} + token/position 8); "
                f"naive torch.save fp32: {r['naive_bytes_per_row']:.1f}"
            )
            print(
                f"  fingerprint    {r['fingerprint_s']:.3f} s for {r['weights_mb']:,.0f} MB of weights "
                f"({r['weights_mb'] / 1e3 / r['fingerprint_s']:.1f} GB/s)   fingerprint/memcpy = "
                f"{r['fingerprint_s'] / r['memcpy_s']:.2f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

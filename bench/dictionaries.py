"""Dictionaries for the encoding: each dictionary under each encoding, at matched L0, on held-out rows.

    .venv/bin/python bench/dictionaries.py            # after (or instead of) bench/encoders.py; about 20 min
    .venv/bin/python bench/dictionaries.py --tiny     # a smoke run (tests/test_bench.py)

Uses bench/encoders.py's setup (the demo's store and TopK SAE, in the same --out, reused) and
trains four more dictionaries from the TopK SAE's, on the training rows:

- the control: the TopK SAE trained 1M rows more as it was (encoder codes, `--train-decoder`),
  so that what the others gain is not just the extra training;
- pursuit-trained: `saekit train --from-pretrained SAE --codes pursuit` (the dictionary learns from
  gradient pursuit's codes; the encoder is left as it was, stale);
- joint (encoder + gp codes): `--codes both` (encoder and dictionary, both codes in the loss);
- joint (unrolled encoder): `--unroll 2 --train-decoder` (an unrolled pursuit encoder and its
  dictionary, trained together end to end).

Each dictionary is then measured under each encoding at the SAE's k (matched L0): its own
encoder, refit (its encoder's atoms, NNLS coefficients), encoder+gp (T=2), an amortised encoder
trained for that dictionary (the best design of bench/encoders.py, `unrolled T=2`, trained with
the dictionary frozen) and gradient pursuit. Every cell is `saekit eval` on the report rows'
whole sequences (rows no run trained on): FVU and ΔCE (nats per token).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from encoders import Design, setup, slug, train_design

from saekit import eval as saekit_eval
from saekit import train

AMORTISED = Design("unrolled T=2", {"unroll": 2})
DICTIONARIES = [
    ("TopK, 1M rows more (control)", {"train_decoder": True}),
    ("pursuit-trained", {"codes": "pursuit"}),
    ("joint: encoder + gp codes", {"codes": "both"}),
    ("joint: unrolled T=2 encoder", {"unroll": 2, "init_encoder": True, "train_decoder": True}),
]
COLUMNS = ["its encoder", "refit", "encoder+gp T=2", f"amortised ({AMORTISED.name})", "gp"]


def train_dictionary(args, s, out: Path, flags: dict) -> Path:
    cfg = train.TrainConfig(
        store=str(s.store.path),
        out=str(out),
        from_pretrained=str(s.sae_dir),
        k=args.k,
        tokens=args.dict_tokens,
        batch_size=512,
        resume=True,
        progress=False,
        **flags,
    )
    return train.run(cfg).out


def cells(args, s, dict_dir: Path, amortised: Path, out: Path) -> dict[str, dict]:
    """`saekit eval` of one dictionary: its encoder, refit, encoder+gp, the amortised encoder, gp."""
    shutil.rmtree(out, ignore_errors=True)  # this script's own report of an earlier run
    res = saekit_eval.run(
        saekit_eval.EvalConfig(
            store=str(s.store.path),
            sae=str(dict_dir),
            out=str(out),
            encoders=[str(amortised)],
            k=[args.k],
            methods=["gp", "refit", "encoder+gp"],
            refine=2,
            sequences=s.sequences,
            progress=False,
        )
    )
    by = {}
    for e in res.entries:
        m = e.method.removesuffix(" (stale)")
        col = {"encoder": COLUMNS[0], "refit": COLUMNS[1], "encoder+gp": COLUMNS[2], "gp": COLUMNS[4]}.get(m)
        if m.startswith("encoder:"):
            col = COLUMNS[3]
        if col is not None:
            d = e.metrics
            by[col] = {"fvu": d.fvu, "l0": d.l0, "delta_ce": d.delta_ce, "kl_mean": d.kl_mean, "stale": e.method != m}
    return by


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/out/encoders", help="bench/encoders.py's work directory (reused)")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--n-features", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--enc-tokens", type=int, default=1_000_000, help="rows each amortised encoder trains on")
    p.add_argument("--dict-tokens", type=int, default=1_000_000, help="rows each new dictionary trains on")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.tokens, args.n_features, args.k, args.steps, args.sequences = 20_000, 256, 8, 40, 4
        args.enc_tokens = args.dict_tokens = 8192
    out = Path(args.out)
    s = setup(args, out)
    dicts = {"TopK SAE": s.sae_dir}
    for name, flags in DICTIONARIES:
        dicts[name] = train_dictionary(args, s, out / "dict" / slug(name), flags)
    table = {}
    for name, d in dicts.items():
        base = out / "dict" / slug(name)
        # The amortised encoder for this dictionary, frozen; distillation codes would be another
        # dictionary's, so none are passed.
        where = out / "enc" / slug(AMORTISED.name) if d == s.sae_dir else base / "amortised"  # bench/encoders.py's
        amortised = train_design(args, s, d, where, AMORTISED, None)
        table[name] = cells(args, s, d, amortised, base / "eval")
        print(f"  measured {name}", flush=True)
    print(f"\nFVU / ΔCE (nats per token) at k {args.k}, on the store's last {args.sequences} sequences (held out):\n")
    print("| dictionary | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, row in table.items():
        vals = []
        for c in COLUMNS:
            v = row.get(c)
            vals.append(
                "" if v is None else f"{v['fvu']:.4f} / {v['delta_ce']:.4f}" + (" (stale)" if v["stale"] else "")
            )
        print(f"| {name} | " + " | ".join(vals) + " |")
    best = min(((n, c) for n, r in table.items() for c in r), key=lambda nc: table[nc[0]][nc[1]]["fvu"])
    print(f"\nlowest FVU: {best[0]} under {best[1]} ({table[best[0]][best[1]]['fvu']:.4f})")
    (out / "dictionaries.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()

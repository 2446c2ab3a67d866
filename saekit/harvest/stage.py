"""Harvest: run a transformer-lens model over texts once and fill an activation store.

`run` loads the texts and the model, finds the store (`--out`, or the cache root: reuse, extend,
resume or new), opens it on rank 0 (the other ranks join it), and drives the main loop
(`saekit.harvest.loop.forward_to_shards`: forward -> assemble -> write) over the shards this rank
owns. Rank r of w computes the sequences whose rows fall in the shards it owns (shard j with
j % w == r) and writes only those shards; a sequence that straddles two ranks' shards is run by
both (each keeps its own rows). A shard on disk whose completion record still matches its rows
(checked on resume) is never recomputed, so `--resume` continues where a killed run stopped and
ends with the same content hash; a finished store is verified before it is reported complete.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.torch import save
from tqdm import tqdm

from saekit.config import check_non_negative, check_positive, need
from saekit.devices import Dist, barrier, broadcast_object, init_dist, on_main, resolve_dtype, shutdown_dist
from saekit.errors import SaekitError, local_path
from saekit.harvest.loop import (
    Plan,
    StreamEnd,
    check_not_empty,
    forward_to_shards,
    make_plan,
    todo_shards,
    too_short,
)
from saekit.harvest.synthetic import HOOK, PREFIX, SyntheticSource, is_synthetic, synthetic_config, true_codes
from saekit.models import LoadedModel, load_model
from saekit.store import StoreLayout, create_store, open_store
from saekit.store.cache_root import Found, cache_root, find, identity_dir, store_path
from saekit.store.format import location_attrs
from saekit.store.location import location, output_place
from saekit.store.writer import extend_store
from saekit.texts import TextSource, load_texts


@dataclass
class HarvestConfig:
    """What to harvest and where. 0/None means "pick a sensible default"."""

    model: str | None = None
    """transformer-lens model name ('gpt2-small'), a local HF checkpoint folder, 'embedded' (None: the default), or synthetic activations with ground truth: 'synthetic:cpu', 'synthetic:synthsaebench-16k' or 'synthetic:CONFIG.json' (a sae-lens SyntheticModelConfig)."""
    hooks: list[str] = field(default_factory=list, metadata={"flag": "--hook"})
    """Hook names to cache, all in one forward pass; repeat --hook for several. Empty: `blocks.{n_layers // 2}.hook_resid_pre`."""
    dataset: str | None = None
    """HF hub dataset name (streamed), a .txt/.jsonl/.parquet file, a save_to_disk folder, or 'embedded' (None: the default)."""
    dataset_config: str | None = None
    """HF dataset configuration name (e.g. 'wikitext-103-raw-v1')."""
    split: str = "train"
    """Dataset split."""
    text_column: str = "text"
    """Column holding the text."""
    out: str | None = None
    """Store directory, or an object-storage URL (s3://bucket/prefix, gs://...). None: found or made in the cache root, named by what it holds."""
    tokens: int = 1_000_000
    """Rows to cache (token positions after skipping); fewer if the dataset runs out first."""
    ctx_len: int = 0
    """Tokens per sequence, BOS included. 0: min(128, the model's n_ctx)."""
    batch_size: int = 0
    """Sequences per forward pass. 0: about 4k tokens per batch on the CPU, 32k on a GPU."""
    skip_first_n_tokens: int = 1
    """Positions at the start of every sequence left out of the cache (1 = the BOS position)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N. Under torchrun each rank takes cuda:LOCAL_RANK."""
    dtype: str = "auto"
    """Model dtype: auto (bf16 on a GPU, fp32 on the CPU), bf16, fp32 or fp16. The cache is bf16 either way."""
    resume: bool = False
    """Continue an interrupted harvest in --out (same arguments required)."""
    overwrite: bool = False
    """Replace an existing store in --out."""
    shard_rows: int = 65536
    """Rows per shard file (the unit of writing, resuming and splitting across ranks)."""
    chunk_rows: int = 4096
    """Rows per inner chunk (the unit of shuffled reads)."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    cache_root: str | None = None
    """Without --out: the shared cache root (a folder or a URL) where a store of the same model, data, context and hooks is reused, extended or created (default: $SAEKIT_CACHE, else ./cache)."""
    staging: str | None = None
    """Local folder where a harvest to a URL keeps each shard until it is uploaded (default: $SAEKIT_STAGING or ~/.cache/saekit/staging)."""
    seed: int | None = None
    """Synthetic models only: the seed of the draw (another dictionary and other rows of the same configuration). None: the model's own (the presets': 42)."""

    def __post_init__(self):
        check_positive("--tokens", self.tokens)
        check_non_negative("--ctx-len", self.ctx_len, "min(128, the model's n_ctx)")
        check_non_negative("--batch-size", self.batch_size, "auto")
        check_non_negative("--skip-first-n-tokens", self.skip_first_n_tokens, "keep every position")
        need(not (self.resume and self.overwrite), "pass either --resume or --overwrite, not both")
        if self.out:
            output_place(self.out)
        if self.cache_root:
            cache_root(self.cache_root)  # the URL check, before a model is loaded
        if self.staging:
            local_path(self.staging, "--staging")
        if is_synthetic(self.model):
            synthetic_config(self.model or "", self.seed)  # a bad preset or config is one line, now
        else:
            need(self.seed is None, "--seed picks the draw of a synthetic model (--model synthetic:...); drop it")


class HarvestResult(NamedTuple):
    path: Path | str
    """The store directory (or its URL)."""
    n_rows: int
    """Rows in the finished store."""
    content_hash: str
    """The store's content hash ('' on ranks other than 0)."""
    tokens_per_s: float
    """Rows computed per second by this process (0 when nothing was left to compute)."""


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def run(cfg: HarvestConfig) -> HarvestResult:
    """Harvest per `cfg` into a store; under torchrun every rank calls this (rank 0 finalizes)."""
    d = init_dist(cfg.device)
    try:
        if is_synthetic(cfg.model):
            return _run_synthetic(cfg, d)
        # texts first: a bad dataset fails in a second, not after a possibly minutes-long model load
        texts = load_texts(cfg.dataset, config=cfg.dataset_config, split=cfg.split, text_column=cfg.text_column)
        lm = load_model(cfg.model, d.device, resolve_dtype(cfg.dtype, d.device, what="--dtype"))
        return run_loaded(cfg, lm, texts)
    finally:
        shutdown_dist(d)  # ends the group only if init_dist started it: a caller's group is kept


def run_loaded(cfg: HarvestConfig, lm: LoadedModel, texts: TextSource) -> HarvestResult:
    """`run` with the model and texts already loaded (cfg.model/dataset/device/dtype are ignored)."""
    d = init_dist(str(lm.model.cfg.device))
    plan = _plan(cfg, lm, texts)
    check_not_empty(plan)
    found = None
    if cfg.out:
        out = output_place(cfg.out)
    else:
        found = on_main(lambda: _find_in_cache_root(cfg, lm, texts, plan), d.main, share=True)
        out = output_place(found.path)
        if found.action == "reuse":
            if d.main:
                print(
                    f"reusing {found.path} from the cache root ({found.n_rows:,} rows, hooks {', '.join(found.hooks)})",
                    file=sys.stderr,
                )
            return HarvestResult(out, found.n_rows, found.content_hash if d.main else "", 0.0)
        cfg, plan = _follow(cfg, found, lm, texts, plan, d.main)
    return _write(cfg, plan, out, found, d)


def _write(cfg: HarvestConfig, plan: Plan, out: Path | str, found: Found | None, d: Dist) -> HarvestResult:
    """Every rank writes its shards of the store at `out`; rank 0 finalizes it."""
    store_at = _opener(cfg, out, plan, found, d.world_size)
    # Rank 0 creates (or checks) the store; the others join after it, and all learn of its errors
    # (the broadcast is a collective, so it also orders creation before joining).
    opened = on_main(lambda: _open_on_main(cfg, out, plan.meta, store_at, found), d.main)
    done_hash = broadcast_object(opened.done_hash if opened else None)
    if done_hash is not None:
        if d.main:
            print(f"store {out} is already complete ({done_hash}); nothing to do", file=sys.stderr)
        return HarvestResult(out, open_store(out, check=False).n_rows, done_hash if d.main else "", 0.0)
    writer = opened.writer if opened else store_at(rank=d.rank)
    rate = _harvest_shards(plan, writer, out, d.rank, d.world_size, cfg.progress and d.main)
    barrier()
    if not d.main:
        writer.close()
        return HarvestResult(out, 0, "", rate)
    attrs = writer.finalize()  # each shard was checked as it was written (and uploaded)
    return HarvestResult(out, attrs["n_rows"], attrs["content_hash"], rate)


def _follow(
    cfg: HarvestConfig, found: Found, lm: LoadedModel, texts: TextSource, plan: Plan, main: bool
) -> tuple[HarvestConfig, Plan]:
    """The config and plan that extend or resume the store the cache root found (or make it new)."""
    if found.action == "extend":  # the store's own hooks and layout: every row it has, more of them
        cfg = replace(cfg, hooks=found.hooks, shard_rows=found.shard_rows, chunk_rows=found.chunk_rows)
        plan = _plan(cfg, lm, texts)
        if main:
            print(f"extending {found.path} from {found.n_rows:,} to {cfg.tokens:,} rows", file=sys.stderr)
    if found.action == "resume":  # its own metadata: it may name other local paths of the same data
        plan = plan._replace(meta=found.meta)
    return replace(cfg, resume=found.action == "resume"), plan


def _opener(cfg: HarvestConfig, out, plan: Plan, found: Found | None, world_size: int) -> Callable[..., Any]:
    """How a rank opens the store to write: create (or resume) it, or extend the one found."""
    if found is not None and found.action == "extend":
        layout = StoreLayout(plan.meta["hooks"], cfg.shard_rows, cfg.chunk_rows)
        return partial(
            extend_store, out, layout, n_rows=cfg.tokens, meta=plan.meta, world_size=world_size, staging=cfg.staging
        )
    opts = dict(n_rows=cfg.tokens, meta=plan.meta, shard_rows=cfg.shard_rows, chunk_rows=cfg.chunk_rows)
    return partial(create_store, out, plan.meta["hooks"], world_size=world_size, staging=cfg.staging, **opts)


class _Opened(NamedTuple):
    """What rank 0 finds at the store: `done_hash` when --resume finds it complete, else its `writer`."""

    done_hash: str | None
    writer: Any  # a StoreWriter, or None when done_hash is set


def _open_on_main(cfg: HarvestConfig, out, meta: dict, store_at: Callable[..., Any], found: Found | None) -> _Opened:
    """Rank 0: the store's content hash when --resume finds it complete, else its writer."""
    done_hash = _already_complete(out, meta) if cfg.resume else None
    if done_hash is not None:
        return _Opened(done_hash, None)
    if found is not None and found.action == "extend":
        return _Opened(None, store_at())
    return _Opened(None, store_at(resume=cfg.resume, overwrite=cfg.overwrite))


def _plan(cfg: HarvestConfig, lm: LoadedModel, texts: TextSource) -> Plan:
    return make_plan(
        lm,
        cfg.hooks,
        texts,
        ctx_len=cfg.ctx_len,
        skip=cfg.skip_first_n_tokens,
        n_rows=cfg.tokens,
        shard_rows=cfg.shard_rows,
        batch_size=cfg.batch_size,
    )


def _find_in_cache_root(cfg: HarvestConfig, lm: LoadedModel, texts: TextSource, plan: Plan) -> Found:
    """What the cache root holds for this harvest (rank 0 looks: `on_main`)."""
    rel = identity_dir(lm.name, texts.name, plan.meta)
    if cfg.overwrite:  # rebuild this request's store, whatever the root holds
        return Found("new", store_path(cache_root(cfg.cache_root), rel, [h.name for h in plan.hooks]), 0, [])
    return find(cache_root(cfg.cache_root), rel, [h.name for h in plan.hooks], cfg.tokens, plan.meta)


def _already_complete(out: Path | str, meta: dict) -> str | None:
    """The content hash of a finished store at `out` made with these arguments, once every shard
    and the statistics check out; None if there is no finished store there (create_store takes
    it from there); an error if it was made with other arguments or is damaged."""
    where = location(out)
    attrs = location_attrs(where)  # None: nothing there, a file, or not a store
    if attrs is None or not attrs.get("complete"):
        return None
    store = open_store(out, check=False)  # refuses damaged or edited attributes
    if _canonical(store.meta) != _canonical(meta):
        old, new = json.loads(_canonical(store.meta)), json.loads(_canonical(meta))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise SaekitError(
            f"store {out} was written with different metadata (differs in: {', '.join(keys)}); "
            "use the same arguments, a new --out, or --overwrite"
        )
    if where.in_place("zarr.json") is None:  # reading every shard back is `saekit verify URL`'s job
        return store.content_hash
    bad = store.verify()
    if bad:
        more = f" (and {len(bad) - 1} more: run `saekit verify {out}`)" if len(bad) > 1 else ""
        raise SaekitError(
            f"store {out} is complete but damaged: {bad[0]}{more}; re-harvest it with --overwrite, or restore the file from a copy"
        )
    return store.content_hash


def _run_synthetic(cfg: HarvestConfig, d: Dist) -> HarvestResult:
    """A synthetic store: sae-lens's model drawn shard by shard, with its ground truth."""
    config = synthetic_config(cfg.model or "", cfg.seed)
    source = SyntheticSource(config, cfg.model or "")  # every rank builds the same model from its seed
    width = source.truth_width()
    features = save({"features": source.features, "bias": source.bias})
    about = {"config": config, "n_features": source.n_features, "truth_width": width}
    meta = {
        "model": cfg.model,
        "synthetic": {**about, "features_sha256": hashlib.sha256(features).hexdigest()},
        "hooks": {HOOK: source.d_model},
        "tokens": "none: synthetic rows have no token ids",
    }
    found = None
    if cfg.out:
        out = output_place(cfg.out)
    else:
        rel = identity_dir("synthetic", (cfg.model or "").removeprefix(PREFIX).rsplit("/", 1)[-1], meta)
        found = on_main(lambda: find(cache_root(cfg.cache_root), rel, [HOOK], cfg.tokens, meta), d.main, share=True)
        out = output_place(found.path)
        if found.action == "reuse":
            return HarvestResult(out, found.n_rows, found.content_hash if d.main else "", 0.0)
        if found.action == "extend":
            raise SaekitError(f"{found.path} holds fewer rows of this synthetic model; pass --out NEW, or --overwrite")
        cfg = replace(cfg, resume=found.action == "resume")
    store_at = partial(
        create_store,
        out,
        {HOOK: source.d_model},
        n_rows=cfg.tokens,
        meta=meta,
        shard_rows=cfg.shard_rows,
        chunk_rows=cfg.chunk_rows,
        world_size=d.world_size,
        staging=cfg.staging,
        truth=width,
        truth_features=features,
    )
    opened = on_main(lambda: _open_on_main(cfg, out, meta, store_at, None), d.main)
    done_hash = broadcast_object(opened.done_hash if opened else None)
    if done_hash is not None:
        return HarvestResult(out, open_store(out, check=False).n_rows, done_hash if d.main else "", 0.0)
    writer = opened.writer if opened else store_at(rank=d.rank)
    rate = _draw_shards(source, writer, cfg, d)
    barrier()
    if not d.main:
        writer.close()
        return HarvestResult(out, 0, "", rate)
    attrs = writer.finalize()
    return HarvestResult(out, attrs["n_rows"], attrs["content_hash"], rate)


def _draw_shards(source: SyntheticSource, writer: Any, cfg: HarvestConfig, d: Dist) -> float:
    """This rank's shards not yet written, drawn and written whole; returns rows per second."""
    s = cfg.shard_rows
    todo = [i for i in range(d.rank, -(-cfg.tokens // s), d.world_size) if not writer.shard_done(i)]
    t0, rows = time.perf_counter(), 0
    bar = tqdm(total=cfg.tokens, unit="row", unit_scale=True, desc="harvest", disable=not (cfg.progress and d.main))
    bar.update(cfg.tokens - sum(min(s, cfg.tokens - i * s) for i in todo))
    with closing(bar):
        for i in todo:
            n = min(s, cfg.tokens - i * s)
            x, feats = source.draw(i, n)
            truth = true_codes(feats, writer.layout.truth, i * s)
            writer.write_shard(i, {HOOK: x}, np.full(n, -1, np.int32), np.zeros(n, np.int32), truth=truth)
            rows += n
            bar.update(n)
    elapsed = time.perf_counter() - t0
    return rows / elapsed if elapsed > 0 else 0.0


def _canonical(obj) -> str:
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True)


def _harvest_shards(plan: Plan, writer, out: Path | str, rank: int, world: int, progress: bool) -> float:
    """Compute and write every shard of this rank that is not on disk yet. Returns rows/s."""
    layout = plan.layout
    for line in writer.damaged:
        print(f"resume: redoing a damaged shard ({line})", file=sys.stderr)
    todo = todo_shards(writer, layout, rank, world)
    if not todo:
        return 0.0
    total = sum(min(layout.shard_rows, layout.n_rows - j * layout.shard_rows) for j in todo)
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {Path(str(out)).name}",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    )
    t0, rows = time.perf_counter(), 0
    with bar, closing(forward_to_shards(plan, writer, out, todo)) as loop:
        try:
            while True:  # not `for`: it would drop the loop's return value
                n = sum(hi - lo for lo, hi in map(layout.seq_rows, next(loop).seq))
                rows += n
                bar.update(n)
        except StopIteration as stop:
            end: StreamEnd = stop.value
    elapsed = time.perf_counter() - t0
    if end.exhausted:
        have = end.seen * layout.per_seq
        if have == 0:
            raise too_short(plan)
        if progress:
            print(
                f"dataset exhausted after {end.seen} sequences: the store holds {have} rows "
                f"instead of --tokens {layout.n_rows}",
                file=sys.stderr,
            )
    return rows / elapsed if elapsed > 0 else 0.0

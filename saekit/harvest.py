"""Harvest: run a transformer-lens model over texts once and fill an activation store.

    texts -> tokens -> packed [ctx_len] sequences -> model (only up to the last hooked layer)
          -> hook activations [b, ctx_len - skip, d] as bf16 -> whole shards -> store

Row layout (identical for any number of ranks and across resumes): sequence i of the packed
stream, position p (p >= skip) is row `i * (ctx_len - skip) + (p - skip)`, for rows < --tokens.
Rank r of w computes the sequences whose rows fall in the shards it owns (shard j with
j % w == r) and writes only those shards; a sequence that straddles two ranks' shards is run by
both (each keeps its own rows). A shard on disk whose completion record still matches its files
(checked on resume) is never recomputed, so `--resume` continues where a killed run stopped and
ends with the same content hash; a finished store is verified before it is reported complete.

A writer thread takes finished shards off the forward loop: the model does not wait on the disk
(the queue holds one shard, so a disk slower than the model applies back-pressure instead of
filling memory).

One main loop, `forward_to_shards`, does forward -> assemble -> write for both `run` (which adds
a progress bar and splits the shards among ranks) and the original sae-kit API in
`saekit.generator` (which also hands each computed row to its consumer).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from saekit import __version__
from saekit.cache_root import Found, cache_root, find, identity_dir, store_path
from saekit.config import check_non_negative, check_positive, need
from saekit.devices import (
    barrier,
    broadcast_error,
    broadcast_object,
    dtype_name,
    init_dist,
    resolve_dtype,
    shutdown_dist,
)
from saekit.errors import SaekitError, check_url, is_disk_full, local_path
from saekit.models import HookSpec, LoadedModel, default_hook, load_model, resolve_hooks, stop_layer
from saekit.remote import Remote, is_remote
from saekit.store import StoreLayout, create_store, open_store, read_attrs
from saekit.store_format import ACTS, POSITIONS, TOKENS, bits_to_bf16
from saekit.store_writer import Kept, extend_store
from saekit.texts import TextSource, load_texts, model_packing, sequences

DEFAULT_CTX_LEN = 128  # the context length of the widely used GPT-2 small residual SAEs


@dataclass
class HarvestConfig:
    """What to harvest and where. 0/None means "pick a sensible default"."""

    model: str | None = None
    """transformer-lens model name ('gpt2-small'), a local HF checkpoint folder, or 'embedded' (None: the default)."""
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

    def __post_init__(self):
        check_positive("--tokens", self.tokens)
        check_non_negative("--ctx-len", self.ctx_len, "min(128, the model's n_ctx)")
        check_non_negative("--batch-size", self.batch_size, "auto")
        check_non_negative("--skip-first-n-tokens", self.skip_first_n_tokens, "keep every position")
        need(not (self.resume and self.overwrite), "pass either --resume or --overwrite, not both")
        if self.out and not is_remote(self.out):
            local_path(self.out, why="harvest writes to a local path or to object storage (s3://, gs://, ...)")
        elif self.out:
            check_url(self.out, "--out")
        if self.cache_root:
            cache_root(self.cache_root)  # the URL check, before a model is loaded
        if self.staging:
            local_path(self.staging, "--staging")


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
# Pure pieces: row layout, forward pass
# ---------------------------------------------------------------------------------------------


class RowLayout(NamedTuple):
    """Where sequence rows land in the store."""

    per_seq: int
    """Rows per sequence: ctx_len - skip."""
    n_rows: int
    """Store capacity (the --tokens budget)."""
    shard_rows: int

    def seq_rows(self, i: int) -> tuple[int, int]:
        """Rows [lo, hi) of sequence i (hi clipped to n_rows)."""
        lo = i * self.per_seq
        return lo, min(lo + self.per_seq, self.n_rows)

    @property
    def n_seqs(self) -> int:
        return math.ceil(self.n_rows / self.per_seq)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_rows / self.shard_rows)

    def shards_of_seq(self, i: int) -> range:
        lo, hi = self.seq_rows(i)
        return range(lo // self.shard_rows, (hi - 1) // self.shard_rows + 1)

    def last_seq_of_shard(self, j: int) -> int:
        last_row = min((j + 1) * self.shard_rows, self.n_rows) - 1
        return last_row // self.per_seq


class ActBatch(NamedTuple):
    """One forward pass worth of activations, on the CPU."""

    seq: list[int]
    """Sequence index of each batch row (store order)."""
    tokens: torch.Tensor
    """[b, ctx_len] int64."""
    acts: dict[str, torch.Tensor]
    """hook -> [b, ctx_len - skip, d] bf16 (trailing hook dims flattened)."""


class _AllHooksFired(Exception):
    """Raised by the last hook to abort the rest of the forward pass (nothing after it is needed)."""


def forward_acts(model, tokens: torch.Tensor, hooks: list[HookSpec], skip: int) -> dict[str, torch.Tensor]:
    """Run `model` only as far as the hooks need and return each hook's activations.

    tokens: [b, ctx] -> {hook: [b, ctx - skip, d] bf16 on the CPU}. The pass stops at
    `stop_at_layer` (the block after the last hooked one) and, inside that block, as soon as every
    hook has fired: `blocks.L.hook_resid_pre` costs blocks 0..L-1 only. Rounding to bf16 happens
    on the model's device, which halves the device-to-host copy.
    """
    out: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        out[hook.name] = act[:, skip:].reshape(act.shape[0], act.shape[1] - skip, -1).to(torch.bfloat16)
        if len(out) == len(hooks):
            raise _AllHooksFired

    kwargs = {}
    if model.tokenizer is not None and model.tokenizer.padding_side == "left":
        # Left-padding tokenizers make transformer-lens infer a mask from pad tokens, which
        # would hide our document separators (often the pad id); packed sequences have no padding.
        kwargs["attention_mask"] = torch.ones_like(tokens)
    stop = stop_layer(hooks, model.cfg.n_layers)
    with torch.inference_mode(), model.hooks(fwd_hooks=[(h.name, grab) for h in hooks]):
        try:
            model(tokens.to(model.cfg.device), stop_at_layer=stop, return_type=None, **kwargs)
        except _AllHooksFired:
            pass
    return {h.name: out[h.name].to("cpu") for h in hooks}


# ---------------------------------------------------------------------------------------------
# Shards: assembling rows into whole shards, writing them off the forward loop
# ---------------------------------------------------------------------------------------------


class Shard(NamedTuple):
    index: int
    acts: dict[str, torch.Tensor]  # hook -> [n, d] bf16
    tokens: torch.Tensor  # [n] int32
    positions: torch.Tensor  # [n] int32


class ShardAssembler:
    """Collects per-sequence rows into whole shards (the store writes whole shards only).

    Only shards in `todo` are kept; rows arrive in store order for those shards.
    """

    def __init__(self, hooks: list[HookSpec], layout: RowLayout, todo: set[int], skip: int, kept: Kept | None = None):
        self.hooks, self.layout, self.todo, self.skip = hooks, layout, todo, skip
        self._bufs: dict[int, dict] = {}  # shard -> buffers + fill
        # an extended store's old last rows are copied, not computed again (see extend_store)
        self.kept_shard, self.kept_stop = -1, 0
        if kept is not None and kept.index in todo:
            buf = self._buf(kept.index)
            n = len(kept.arrays[TOKENS])
            for h in hooks:
                buf["acts"][h.name][:n] = bits_to_bf16(kept.arrays[f"{ACTS}/{h.name}"])
            buf["tokens"][:n] = torch.from_numpy(kept.arrays[TOKENS])
            buf["positions"][:n] = torch.from_numpy(kept.arrays[POSITIONS])
            buf["fill"] = n
            self.kept_shard, self.kept_stop = kept.index, kept.index * layout.shard_rows + n

    def _expected(self, j: int) -> int:
        s = self.layout.shard_rows
        return min(s, self.layout.n_rows - j * s)

    def _buf(self, j: int) -> dict:
        if j not in self._bufs:
            n = self._expected(j)
            self._bufs[j] = {
                "acts": {h.name: torch.empty((n, h.d), dtype=torch.bfloat16) for h in self.hooks},
                "tokens": torch.empty(n, dtype=torch.int32),
                "positions": torch.empty(n, dtype=torch.int32),
                "fill": 0,
            }
        return self._bufs[j]

    def add(self, batch: ActBatch) -> list[Shard]:
        """Place every sequence's rows; return the shards this batch completed."""
        s, done = self.layout.shard_rows, []
        ctx = batch.tokens.shape[1]
        positions = torch.arange(self.skip, ctx, dtype=torch.int32)
        for b, i in enumerate(batch.seq):
            lo, hi = self.layout.seq_rows(i)
            for j in self.layout.shards_of_seq(i):
                if j not in self.todo:
                    continue
                a, z = max(lo, j * s), min(hi, (j + 1) * s)  # rows of seq i inside shard j
                if j == self.kept_shard:  # ...but not those kept
                    a = max(a, self.kept_stop)
                    if a >= z:
                        continue
                buf = self._buf(j)
                if buf["fill"] != a - j * s:
                    raise RuntimeError(f"rows of shard {j} arrived out of order ({a} after {buf['fill']})")
                dst = slice(a - j * s, z - j * s)
                src = slice(a - lo, z - lo)
                for h in self.hooks:
                    buf["acts"][h.name][dst] = batch.acts[h.name][b, src]
                buf["tokens"][dst] = batch.tokens[b, self.skip :][src].to(torch.int32)
                buf["positions"][dst] = positions[src]
                buf["fill"] = z - j * s
                if buf["fill"] == self._expected(j):
                    done.append(self._pop(j, buf["fill"]))
        return done

    def _pop(self, j: int, n: int) -> Shard:
        buf = self._bufs.pop(j)
        return Shard(j, {k: v[:n] for k, v in buf["acts"].items()}, buf["tokens"][:n], buf["positions"][:n])

    def flush(self) -> list[Shard]:
        """The data ran out: hand over the partly filled shard(s), which end the store."""
        return [self._pop(j, buf["fill"]) for j, buf in sorted(self._bufs.items()) if buf["fill"] > 0]


class ShardWriterThread:
    """Writes shards with `writer.write_shard` on a background thread.

    The queue holds one shard, so the forward loop runs while the previous shard is written and
    blocks only when the disk is slower than the model. A write error stops the thread and is
    re-raised on the caller's next `put` or at `close`.
    """

    def __init__(self, writer, store_path: Path):
        self._writer, self._path = writer, store_path
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="saekit-shard-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while (shard := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_shard(shard.index, shard.acts, shard.tokens, shard.positions)
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self._error = e

    def _raise(self):
        e = self._error
        if e is None:
            return
        if is_disk_full(e):
            raise SaekitError(
                f"disk full while writing {self._path}: free space (or pick another --out), then rerun with --resume; finished shards are kept"
            ) from e
        raise e

    def put(self, shard: Shard) -> None:
        self._raise()
        self._q.put(shard)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()


# ---------------------------------------------------------------------------------------------
# Setup shared by `run` and `cached_activation_generator`
# ---------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """Everything resolved before the first forward pass."""

    lm: LoadedModel
    hooks: list[HookSpec]
    texts: TextSource
    ctx_len: int
    skip: int
    layout: RowLayout
    batch_size: int
    meta: dict


def _auto_batch(device: torch.device, ctx_len: int) -> int:
    return max(1, (32768 if device.type == "cuda" else 4096) // ctx_len)


def make_plan(
    lm: LoadedModel,
    hook_names: list[str],
    texts: TextSource,
    *,
    ctx_len: int,
    skip: int,
    n_rows: int,
    shard_rows: int,
    batch_size: int,
    extra_meta: dict | None = None,
) -> Plan:
    """Validate hooks, context length and skip against the model; build the store metadata."""
    model = lm.model
    hooks = resolve_hooks(model, hook_names or [default_hook(model)])
    ctx_len = ctx_len or min(DEFAULT_CTX_LEN, model.cfg.n_ctx)
    packing = model_packing(model, ctx_len)
    if skip >= ctx_len:
        raise SaekitError(f"--skip-first-n-tokens {skip} leaves nothing of a {ctx_len}-token sequence: use fewer")
    layout = RowLayout(ctx_len - skip, n_rows, shard_rows)
    device = torch.device(model.cfg.device)
    tok = model.tokenizer
    # Everything that decides the stored bytes, and nothing that does not (no ranks, batch size,
    # paths of the run or timestamps): equal metadata => equal content hash.
    meta = {
        "stage": "harvest",
        "saekit_version": __version__,
        "model": lm.meta,
        "dataset": texts.meta,
        "tokenizer": {
            "name": _tokenizer_name(tok),
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "sha256": _tokenizer_sha(tok),
        },
        "hooks": {h.name: h.d for h in hooks},
        "ctx_len": ctx_len,
        "bos_id": packing.bos_id,
        "separator_id": packing.sep_id,
        "packing": "documents + separator concatenated, cut into full ctx_len sequences, BOS first",
        "skip_first_n_tokens": skip,
        "tokens": n_rows,
        "device_type": device.type,
        "dtype": dtype_name(model.cfg.dtype),
        "activation_dtype": "bfloat16",
        **(extra_meta or {}),
    }
    return Plan(lm, hooks, texts, ctx_len, skip, layout, batch_size or _auto_batch(device, ctx_len), meta)


def _tokenizer_name(tok) -> str:
    """Hub name as is; a local folder by its name only (the sha256 identifies it, and the store's
    hash must not depend on where a checkout lives)."""
    name = str(getattr(tok, "name_or_path", "") or "")
    return Path(name).name if name and Path(name).exists() else name


def _tokenizer_sha(tok) -> str:
    """Identity of a fast tokenizer's full definition (vocab, merges, normalizer, specials)."""
    backend = getattr(tok, "backend_tokenizer", None)
    raw = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The main loop: forward -> assemble -> write, shared by `run` and saekit.generator
# ---------------------------------------------------------------------------------------------


class StreamEnd(NamedTuple):
    """How far the main loop read the packed sequence stream."""

    seen: int
    """Sequences the stream yielded (at most as many as the shards to write need)."""
    exhausted: bool
    """The texts ran out before the last needed sequence: the store ends early."""


def forward_to_shards(
    plan: Plan, writer, path: Path, todo: set[int], first_seq: int = 0
) -> Generator[ActBatch, None, StreamEnd]:
    """Run the model over the sequences that shards `todo` need and write those shards.

    Sequence 0 is the packed stream's `first_seq`-th. Completed shards go to `writer` on a
    writer thread; if the texts run out, the partly filled shard(s) end the store. Yields every
    batch once its rows are placed (for a progress bar, or rows to hand on); returns how far the
    stream went. Closing the generator early still lands the shards already queued.
    """
    asm = ShardAssembler(plan.hooks, plan.layout, todo, plan.skip, getattr(writer, "kept", None))
    wanted, n_seqs = _needed_seqs(plan.layout, todo, asm.kept_shard, asm.kept_stop)
    seqs = itertools.islice(sequences(plan.lm.model, plan.texts, plan.ctx_len), first_seq, first_seq + n_seqs)
    thread = ShardWriterThread(writer, path)
    seen, idx, rows = 0, [], []
    try:
        for seen, seq in enumerate(seqs, 1):
            if wanted(seen - 1):
                idx.append(seen - 1)
                rows.append(seq)
                if len(idx) == plan.batch_size:
                    yield _forward_batch(plan, asm, thread, idx, rows)
                    idx, rows = [], []
        if idx:
            yield _forward_batch(plan, asm, thread, idx, rows)
        if seen < n_seqs:
            for shard in asm.flush():
                thread.put(shard)
    finally:
        thread.close()
    return StreamEnd(seen, seen < n_seqs)


def _forward_batch(
    plan: Plan, asm: ShardAssembler, thread: ShardWriterThread, idx: list[int], rows: list[list[int]]
) -> ActBatch:
    """Sequences `idx` (their token ids `rows`) through the model; completed shards to the writer."""
    tokens = torch.tensor(rows, dtype=torch.long)
    batch = ActBatch(idx, tokens, forward_acts(plan.lm.model, tokens, plan.hooks, plan.skip))
    for shard in asm.add(batch):
        thread.put(shard)
    return batch


def todo_shards(writer, layout: RowLayout, rank: int = 0, world: int = 1) -> set[int]:
    """The shards rank `rank` of `world` owns that are not on disk yet."""
    return {j for j in range(rank, layout.n_shards, world) if not writer.shard_done(j)}


def _needed_seqs(layout: RowLayout, todo: set[int], kept_shard: int = -1, kept_stop: int = 0):
    """(wanted(i), number of sequences to enumerate) for the shards still to write; the rows of
    shard `kept_shard` below `kept_stop` are kept, not computed."""
    if not todo:
        return (lambda i: False), 0

    def wanted(i: int) -> bool:
        return any(
            j in todo and (j != kept_shard or layout.seq_rows(i)[1] > kept_stop) for j in layout.shards_of_seq(i)
        )

    return wanted, max(layout.last_seq_of_shard(j) for j in todo) + 1


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def run(cfg: HarvestConfig) -> HarvestResult:
    """Harvest per `cfg` into a store; under torchrun every rank calls this (rank 0 finalizes)."""
    d = init_dist(cfg.device)
    try:
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
    _check_not_empty(plan)
    found = None
    if cfg.out:
        out = check_url(cfg.out, "--out") if is_remote(cfg.out) else local_path(cfg.out)
    else:
        found = _find_in_cache_root(cfg, lm, texts, plan, d.main)
        out = found.path if is_remote(found.path) else Path(found.path)
        if found.action == "reuse":
            if d.main:
                print(
                    f"reusing {found.path} from the cache root ({found.n_rows:,} rows, hooks {', '.join(found.hooks)})",
                    file=sys.stderr,
                )
            return HarvestResult(out, found.n_rows, found.content_hash if d.main else "", 0.0)
        if found.action == "extend":  # the store's own hooks and layout: every row it has, more of them
            cfg = replace(cfg, hooks=found.hooks, shard_rows=found.shard_rows, chunk_rows=found.chunk_rows)
            plan = _plan(cfg, lm, texts)
            if d.main:
                print(f"extending {found.path} from {found.n_rows:,} to {cfg.tokens:,} rows", file=sys.stderr)
        if found.action == "resume":  # its own metadata: it may name other local paths of the same data
            plan = plan._replace(meta=found.meta)
        cfg = replace(cfg, resume=found.action == "resume")

    # Rank 0 creates (or checks) the store; the others join after it, and all learn of its
    # errors (broadcast_error is a collective, so it also orders creation before joining).
    store_at = partial(
        create_store,
        out,
        plan.meta["hooks"],
        n_rows=cfg.tokens,
        meta=plan.meta,
        shard_rows=cfg.shard_rows,
        chunk_rows=cfg.chunk_rows,
        world_size=d.world_size,
        staging=cfg.staging,
    )
    if found is not None and found.action == "extend":
        layout = StoreLayout(plan.meta["hooks"], cfg.shard_rows, cfg.chunk_rows)
        store_at = partial(
            extend_store, out, layout, n_rows=cfg.tokens, meta=plan.meta, world_size=d.world_size, staging=cfg.staging
        )
    writer, err, done_hash = None, None, None
    if d.main:
        try:
            done_hash = _already_complete(out, plan.meta) if cfg.resume else None
            if done_hash is None:
                writer = (
                    store_at()
                    if found and found.action == "extend"
                    else store_at(resume=cfg.resume, overwrite=cfg.overwrite)
                )
        except SaekitError as e:
            err = str(e)
    err = broadcast_error(err)
    if err is not None:
        raise SaekitError(err)
    done_hash = broadcast_error(done_hash)
    if done_hash is not None:
        if d.main:
            print(f"store {out} is already complete ({done_hash}); nothing to do", file=sys.stderr)
        return HarvestResult(out, open_store(out, check=False).n_rows, done_hash if d.main else "", 0.0)
    if not d.main:
        writer = store_at(rank=d.rank)
    rate = _harvest_shards(plan, writer, out, d.rank, d.world_size, cfg.progress and d.main)
    barrier()
    if not d.main:
        writer.close()
        return HarvestResult(out, 0, "", rate)
    attrs = writer.finalize()
    if is_remote(out):  # the shards were checked as they were uploaded
        return HarvestResult(out, attrs["n_rows"], attrs["content_hash"], rate)
    store = open_store(out)
    return HarvestResult(out, store.n_rows, store.content_hash, rate)


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


def _find_in_cache_root(cfg: HarvestConfig, lm: LoadedModel, texts: TextSource, plan: Plan, main: bool) -> Found:
    """What the cache root holds for this harvest (rank 0 looks; every rank gets its answer)."""
    found, err = None, None
    if main:
        try:
            rel = identity_dir(lm.name, texts.name, plan.meta)
            if cfg.overwrite:  # rebuild this request's store, whatever the root holds
                found = Found("new", store_path(cache_root(cfg.cache_root), rel, [h.name for h in plan.hooks]), 0, [])
            else:
                found = find(cache_root(cfg.cache_root), rel, [h.name for h in plan.hooks], cfg.tokens, plan.meta)
        except SaekitError as e:
            err = str(e)
    err = broadcast_error(err)
    if err is not None:
        raise SaekitError(err)
    return broadcast_object(found)


def _already_complete(out: Path, meta: dict) -> str | None:
    """The content hash of a finished store at `out` made with these arguments, once every shard
    and the statistics check out; None if there is no finished store there (create_store takes
    it from there); an error if it was made with other arguments or is damaged."""
    if is_remote(out):
        if Remote(out).read_bytes("zarr.json") is None:
            return None
        store = open_store(out, allow_incomplete=True, check=False)  # refuses damaged or edited attributes
        if not store.complete:
            return None
    else:
        attrs = read_attrs(out)  # None: nothing there, a file, or not a store
        if not (attrs or {}).get("complete"):
            return None
        store = open_store(out, check=False)  # refuses damaged or edited attributes
    if _canonical(store.meta) != _canonical(meta):
        old, new = json.loads(_canonical(store.meta)), json.loads(_canonical(meta))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise SaekitError(
            f"store {out} was written with different metadata (differs in: {', '.join(keys)}); "
            "use the same arguments, a new --out, or --overwrite"
        )
    if is_remote(out):  # reading every shard back is `saekit verify URL`'s job, not a resume's
        return store.content_hash
    bad = store.verify()
    if bad:
        more = f" (and {len(bad) - 1} more: run `saekit verify {out}`)" if len(bad) > 1 else ""
        raise SaekitError(
            f"store {out} is complete but damaged: {bad[0]}{more}; re-harvest it with --overwrite, or restore the file from a copy"
        )
    return store.content_hash


def _check_not_empty(plan: Plan) -> None:
    """Fail before creating a store when the texts do not fill even one sequence."""
    if next(sequences(plan.lm.model, plan.texts, plan.ctx_len), None) is None:
        raise _too_short(plan)


def _too_short(plan: Plan) -> SaekitError:
    return SaekitError(
        f"dataset {plan.texts.name} is empty or shorter than one {plan.ctx_len}-token sequence: "
        "use more text or a smaller --ctx-len"
    )


def _canonical(obj) -> str:
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True)


def _harvest_shards(plan: Plan, writer, out: Path, rank: int, world: int, progress: bool) -> float:
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
            raise _too_short(plan)
        if progress:
            print(
                f"dataset exhausted after {end.seen} sequences: the store holds {have} rows "
                f"instead of --tokens {layout.n_rows}",
                file=sys.stderr,
            )
    return rows / elapsed if elapsed > 0 else 0.0


def __getattr__(name: str):
    # `from saekit.harvest import cached_activation_generator`, the original API's import path
    # before it moved, keeps working. Its home, saekit.generator, builds on this module, so
    # importing it at the top would be circular.
    if name == "cached_activation_generator":
        from saekit.generator import cached_activation_generator

        return cached_activation_generator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

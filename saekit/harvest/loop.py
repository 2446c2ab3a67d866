"""Harvest's main loop: forward -> assemble -> write, shared by `saekit.harvest.run` and the
original API's `saekit.harvest.generator`.

    texts -> tokens -> packed [ctx_len] sequences -> model (only up to the last hooked layer)
          -> hook activations [b, ctx_len - skip, d] as bf16 -> whole shards -> a store writer

Row layout (identical for any number of ranks and across resumes): sequence i of the packed
stream, position p (p >= skip) is row `i * (ctx_len - skip) + (p - skip)`, for rows < --tokens.
A writer thread takes finished shards off the forward loop: the model does not wait on the disk
(the queue holds one shard, so a disk slower than the model applies back-pressure instead of
filling memory).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import threading
from collections.abc import Generator
from pathlib import Path
from typing import NamedTuple

import torch

from saekit import __version__
from saekit.devices import dtype_name
from saekit.errors import SaekitError, is_disk_full
from saekit.models import HookSpec, LoadedModel, default_hook, resolve_hooks, stop_layer
from saekit.store.format import ACTS, POSITIONS, TOKENS, bits_to_bf16
from saekit.store.writer import Kept
from saekit.texts import TextSource, model_packing, sequences

DEFAULT_CTX_LEN = 128  # the context length of the widely used GPT-2 small residual SAEs


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

    def __init__(self, writer, store_path: Path | str):
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
# The main loop: forward -> assemble -> write, shared by `run` and saekit.harvest.generator
# ---------------------------------------------------------------------------------------------


class StreamEnd(NamedTuple):
    """How far the main loop read the packed sequence stream."""

    seen: int
    """Sequences the stream yielded (at most as many as the shards to write need)."""
    exhausted: bool
    """The texts ran out before the last needed sequence: the store ends early."""


def forward_to_shards(
    plan: Plan, writer, path: Path | str, todo: set[int], first_seq: int = 0
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


def check_not_empty(plan: Plan) -> None:
    """Fail before creating a store when the texts do not fill even one sequence."""
    if next(sequences(plan.lm.model, plan.texts, plan.ctx_len), None) is None:
        raise too_short(plan)


def too_short(plan: Plan) -> SaekitError:
    return SaekitError(
        f"dataset {plan.texts.name} is empty or shorter than one {plan.ctx_len}-token sequence: "
        "use more text or a smaller --ctx-len"
    )

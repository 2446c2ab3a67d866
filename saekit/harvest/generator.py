"""The original sae-kit API, `cached_activation_generator`, backed by saekit activation stores.

It cuts the packed token stream into runs of whole sequences and harvests each run lazily into
its own store with harvest's main loop (`saekit.harvest.loop.forward_to_shards`), handing every row to
the consumer as soon as it is computed; a finished run is read back instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
from collections.abc import Generator, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.harvest.loop import (
    ActBatch,
    Plan,
    RowLayout,
    StreamEnd,
    forward_to_shards,
    make_plan,
    todo_shards,
)
from saekit.models import LoadedModel, describe_model
from saekit.store import create_store, open_store, read_attrs
from saekit.store.cache_root import DEFAULT_ROOT
from saekit.texts import TextSource, dataset_source, load_texts, sequences


def _object_identity(model, dataset, text_column: str) -> tuple[LoadedModel, TextSource]:
    """Provenance for objects handed to us (rather than names we loaded ourselves)."""
    if isinstance(dataset, TextSource):
        texts = dataset
    elif isinstance(dataset, (str, Path)):
        texts = load_texts(str(dataset), text_column=text_column)
    else:
        texts = dataset_source(dataset, text_column)
    name = model.cfg.model_name
    return describe_model(model, name, {"source": "object", "name": name}), texts


def cached_activation_generator(
    model,
    dataset,
    hook_name: str | None = None,
    activation_batch_size: int = 4096,
    generator_batch_size: int = 24,
    acts_per_run: int = 1_000_000,
    ctx_len: int = 128,
    skip_first_n_tokens: int = 1,
    save_to_disk: str | None = None,
    *,
    text_column: str = "text",
    max_runs: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield `[activation_batch_size, d_model]` bf16 activations of `hook_name`, harvesting
    lazily into the activation cache: the original sae-kit API, backed by saekit stores.

    model: a HookedTransformer with its tokenizer. dataset: an HF `Dataset`/`IterableDataset`
    (e.g. `load_dataset("openwebtext", split="train", streaming=True)`), a local file or folder
    path, or a `texts.TextSource`.

    The packed token stream is cut into runs of about `acts_per_run` rows (whole sequences); each
    run is one store, `<save_to_disk>/run-00000`, `run-00001`, ... where `save_to_disk` defaults
    to `cache/generator-<key>` and `<key>` hashes the store metadata of run 0: model name and
    weights fingerprint, dataset name/config/split/fingerprint and a hash of its first 16
    documents, tokenizer, hook, ctx_len, skip, run size. A finished run is read back instead of
    recomputed; a run cut short (the consumer stopped early) is resumed from its last whole
    shard. The first batch arrives after one model batch (`generator_batch_size` sequences).

    A stream is known by what it yields: a cached row is handed out only once this stream's own
    token ids for it equal the stored ones (the stream is tokenized, the model is not run), so a
    filtered or cut stream with the same first documents never gets another stream's rows; a
    cached run that is not this stream's is a one-line error naming the folder.

    Rows come in store order, sequence after sequence; for shuffled training batches read the
    stores with `saekit.store.open_store(path).shuffled_batches(...)`. The generator ends when
    the dataset does, or after `max_runs` runs. Arguments are checked before the first batch.
    """
    lm, texts = _object_identity(model, dataset, text_column)
    per_seq = ctx_len - skip_first_n_tokens
    if per_seq <= 0:
        raise SaekitError(f"skip_first_n_tokens {skip_first_n_tokens} leaves nothing of a {ctx_len}-token sequence")
    run_rows = math.ceil(acts_per_run / per_seq) * per_seq
    plan = make_plan(
        lm,
        [hook_name] if hook_name else [],
        texts,
        ctx_len=ctx_len,
        skip=skip_first_n_tokens,
        n_rows=run_rows,
        shard_rows=_shard_rows(run_rows),
        batch_size=generator_batch_size,
    )
    key = hashlib.sha256(json.dumps(plan.meta, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(save_to_disk) if save_to_disk else Path(DEFAULT_ROOT) / f"generator-{key}"
    return _rebatch(_generator_rows(plan, root, max_runs), activation_batch_size)


def _shard_rows(run_rows: int) -> int:
    """A small run is one shard of one chunk; a larger one has shards of whole 4096-row chunks
    (up to 65,536 rows; the store requires whole chunks), its last shard partly filled."""
    return run_rows if run_rows <= 4096 else min(65536, math.ceil(run_rows / 4096) * 4096)


def _generator_rows(plan: Plan, root: Path, max_runs: int | None) -> Iterator[torch.Tensor]:
    seqs_per_run = plan.layout.n_rows // plan.layout.per_seq
    for run_index in itertools.count():
        if max_runs is not None and run_index >= max_runs:
            return
        first = run_index * seqs_per_run
        run_plan = plan._replace(meta={**plan.meta, "generator_run": run_index, "first_sequence": first})
        ended = yield from _run_rows(run_plan, root / f"run-{run_index:05d}", first)
        if ended:
            return


def _rebatch(rows: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Row blocks of any size -> batches of exactly `batch_size` rows (the last may be short)."""
    pending: list[torch.Tensor] = []
    have = 0
    for x in rows:
        pending.append(x)
        have += len(x)
        if have >= batch_size:
            buf = torch.cat(pending)
            n_full = len(buf) // batch_size * batch_size
            yield from buf[:n_full].split(batch_size)
            pending, have = [buf[n_full:]], len(buf) - n_full
    if have:
        yield torch.cat(pending)


def _run_rows(plan: Plan, path: Path, first_seq: int) -> Generator[torch.Tensor, None, bool]:
    """Rows of one generator run, in store order: read back where `path` has them (each row only
    once this stream's own tokens for it prove it is this stream's), computed (and written) batch
    by batch otherwise. Returns True when the dataset ended inside this run."""
    hook, layout = plan.hooks[0].name, plan.layout
    if (read_attrs(path) or {}).get("complete"):
        store = open_store(path)  # a damaged run is an error here, not something to write over
        stream = _stream_tokens(plan, first_seq)
        ended = yield from _proven_rows(store, hook, store.n_rows, stream, path)
        if ended:  # this stream ends inside the cached run: its rows so far were this stream's
            return True
        if store.n_rows < layout.n_rows and next(stream, None) is not None:
            raise _other_stream(path, f"it ends after row {store.n_rows}, where this dataset goes on")
        return store.n_rows < layout.n_rows
    writer = create_store(
        path,
        plan.meta["hooks"],
        n_rows=layout.n_rows,
        meta=plan.meta,
        shard_rows=layout.shard_rows,
        chunk_rows=min(4096, layout.shard_rows),
        resume=path.exists(),
    )
    start = writer.resume_row  # one writer: every shard before this row is on disk
    if start:
        store = open_store(path, allow_incomplete=True)
        if (yield from _proven_rows(store, hook, start, _stream_tokens(plan, first_seq), path)):
            return True
    # closing: when the consumer stops early, the shards already queued still land
    with closing(forward_to_shards(plan, writer, path, todo_shards(writer, layout), first_seq)) as loop:
        end = yield from _computed_rows(loop, hook, layout, start)
    if end.exhausted and end.seen == 0:
        shutil.rmtree(path, ignore_errors=True)  # the stream ended exactly at this run: no empty store
        return True
    writer.finalize()
    return end.exhausted


def _stream_tokens(plan: Plan, first_seq: int) -> Iterator[np.ndarray]:
    """The token ids of each row of this stream's sequences from `first_seq` on, a sequence at a
    time: what the rows of a run must have been computed from."""
    seqs = itertools.islice(sequences(plan.lm.model, plan.texts, plan.ctx_len), first_seq, None)
    return (np.asarray(seq[plan.skip :], dtype=np.int32) for seq in seqs)


def _proven_rows(
    store, hook: str, stop: int, stream: Iterator[np.ndarray], path: Path
) -> Generator[torch.Tensor, None, bool]:
    """Rows [0, stop) of `hook` in a cached run, each block handed out only after `stream`'s token
    ids for its rows equal the stored ones. A streamed dataset is known by its first documents
    only, so another stream with the same start (a filter, another take) finds the same run: its
    rows are this stream's only as far as its tokens are. Returns True when `stream` ended
    first (the rows handed out are then all of this stream's)."""
    pending = np.empty(0, np.int32)
    for lo in range(0, stop, _PROVE_ROWS):
        hi = min(stop, lo + _PROVE_ROWS)
        parts, have = [pending], len(pending)
        while have < hi - lo and (seq := next(stream, None)) is not None:
            parts.append(seq)
            have += len(seq)
        pending = np.concatenate(parts)  # once per block, not once per sequence
        n = min(len(pending), hi - lo)  # only whole sequences: the packed stream drops a last partial one
        stored = store.tokens(lo, lo + n).numpy()
        differ = np.flatnonzero(stored != pending[:n])
        if differ.size:
            raise _other_stream(path, f"the tokens of its row {lo + int(differ[0])} are not this dataset's")
        if n:
            yield store.rows(hook, lo, lo + n)
        if n < hi - lo:
            return True
        pending = pending[n:]
    return False


_PROVE_ROWS = 65536  # rows checked and handed out at a time


def _other_stream(path: Path, why: str) -> SaekitError:
    return SaekitError(
        f"the cached run {path} was made from another text stream ({why}): a filtered, cut or reordered "
        f"dataset with the same first documents? pass save_to_disk= a folder of this dataset's own, or delete {path.parent}"
    )


def _computed_rows(
    loop: Generator[ActBatch, None, StreamEnd], hook: str, layout: RowLayout, start: int
) -> Generator[torch.Tensor, None, StreamEnd]:
    """Each sequence's rows of `hook` from row `start` on, batch by batch as the main loop computes
    them: `[rows, d]` bf16. Returns the loop's StreamEnd."""
    while True:  # not `for`: it would drop the loop's return value
        try:
            batch = next(loop)
        except StopIteration as stop:
            return stop.value
        for b, i in enumerate(batch.seq):
            lo, hi = layout.seq_rows(i)
            if hi > max(lo, start):
                yield batch.acts[hook][b, max(lo, start) - lo : hi - lo]

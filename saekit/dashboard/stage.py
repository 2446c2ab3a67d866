"""`DashboardConfig` + `run(cfg)`: what each latent means, as a static site (`saekit dashboard`).

    store rows (held-out by default), memory-mapped, in batches
      -> the SAE's encoder codes [b, k]; with --codes, the pursuit codes of the same rows
      -> per latent, for each encoding: nonzero count, max, a histogram, a bounded top-N of rows
         and a uniform sample of its nonzero activations (no [rows, n_features] matrix)
      -> windows of tokens around each chosen row, decoded with the store's model's tokenizer
      -> index.html and latent_<i>.html (`saekit.dashboard.html`)

The histogram bins are global and log-spaced (a quarter octave each, 2^-32 .. 2^32), so one pass
suffices: no per-latent range is needed before binning. The lower-quantile samples come from a
uniform sample of each latent's nonzero activations (the `SAMPLES` with the smallest hash of
(row, latent, seed): independent of the batching), split into quartiles of value.
Every nonzero the encoder outputs counts (`saekit.encodings.encode`, the encoder's own output): a Batch-TopK encoder at
its threshold, a ReLU or a JumpReLU encoder is never cut to a k. The codes of the dashboard's
rows are kept sparse (each row's nonzeros, one after another) to shade the windows' tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saekit.codes import group_name, open_codes_for
from saekit.config import check_non_negative, check_positive, need
from saekit.devices import resolve_device
from saekit.encodings import ENCODER, encode
from saekit.errors import SaekitError, is_non_empty, one_line, output_dir
from saekit.measure.heldout import sae_held_out
from saekit.models import check_has_tokens, store_model_spec
from saekit.pursuit import SparseCodes
from saekit.sae import check_sae_fits_hook, load_sae
from saekit.store import open_store
from saekit.store.shard_cache import ShardCacheFields

BINS = 256
BINS_PER_OCTAVE = 4
"""Histogram bin b holds values in [2^((b - BINS/2) / 4), 2^((b + 1 - BINS/2) / 4))."""
SAMPLES = 48
"""Uniformly sampled nonzero activations kept per latent, for the lower-quantile panel."""


@dataclass
class DashboardConfig(ShardCacheFields):
    """Everything `saekit dashboard` needs; each field is a CLI flag."""

    store: str = ""
    """Activation store written by `saekit harvest`: its rows, token ids and positions."""
    sae: str = ""
    """The SAE whose latents are shown: a saekit run dir, a saekit SAE dir, a local sae-lens dir, or sae-lens RELEASE/ID."""
    out: str = ""
    """Output directory for the site (index.html, latent_<i>.html); must be new or empty."""
    codes: str = ""
    """A `saekit pursue` output: each page shows the latent under the encoder and under these codes, side by side."""
    group: str = ""
    """The codes group shown with --codes (e.g. gp_k16); default: gp_k<k> for the SAE's k."""
    latents: str = ""
    """Latent ids to show, comma-separated (e.g. 0,5,17); default: every latent."""
    top: int = 0
    """Show the N latents most often active under the encoder."""
    random: int = 0
    """Show N latents drawn at random (--seed)."""
    seed: int = 0
    """Seed of --random and of the lower-quantile samples."""
    rows: int = 0
    """Use the first N held-out rows (those `saekit train` held out); 0: all of them."""
    contexts: int = 20
    """Top-activating contexts kept per latent and encoding."""
    window: int = 12
    """Tokens shown on each side of a context's max token."""
    hook: str | None = None
    """Hook to show; default: the store's only hook."""
    model: str = ""
    """Load this model (a transformer-lens name or a local checkpoint folder) for the tokenizer and W_U instead of the one the store records."""
    batch_size: int = 4096
    """Rows per encoder batch."""
    device: str = "cpu"
    """'cpu', 'auto' (CUDA if available), 'cuda' or 'cuda:N'."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --cache-dir, --cache-gb
        need(bool(self.store), "--store is required: the activation store whose rows are shown")
        need(bool(self.sae), "--sae is required: a run dir, a saekit or sae-lens SAE dir, or RELEASE/ID")
        need(bool(self.out), "--out is required: the directory for the site")
        need(not self.group or bool(self.codes), "--group needs --codes: the `saekit pursue` output holding it")
        chosen = [f for f in ("--latents", "--top", "--random") if getattr(self, f[2:])]
        need(len(chosen) <= 1, f"pass one of {', '.join(chosen)}, not several")
        parse_latents(self.latents)
        for flag in ("--top", "--random", "--rows"):
            check_non_negative(
                flag, getattr(self, flag[2:]), "every latent" if flag != "--rows" else "all held-out rows"
            )
        check_positive("--contexts", self.contexts)
        check_non_negative("--window", self.window, "the max token alone")
        check_positive("--batch-size", self.batch_size)


def parse_latents(text: str) -> list[int]:
    """'0,5,17' -> [0, 5, 17]; one line for anything else."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise SaekitError(f"--latents {text!r} is not a comma-separated list of latent ids (e.g. 0,5,17)")
    return sorted(set(map(int, parts)))


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


def group_top_n(group: Tensor, priority: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per group, the n entries of highest priority. group, priority: [m] -> (kept entry indices
    [<= m], their rank in their group). Ties keep the earlier entry (stable sorts)."""
    order = priority.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]
    g = group[order]
    counts = torch.bincount(g)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(g)) - starts[g]
    keep = rank < n
    return order[keep], rank[keep]


class TopN:
    """For each of n_features latents, the n entries (row, value) of highest priority seen so far.

    Offered entries that beat a latent's current n-th best wait in a pending list; merging them
    into the buffer (one sort of buffer + pending) happens when the list is long (`merge_`), so
    the sort's cost is shared by many batches and later batches rarely pass the thresholds.
    """

    def __init__(self, n_features: int, n: int, pending: int = 1 << 21):
        self.n, self.n_features, self.cap = n, n_features, max(pending, 4 * n_features * n)
        self.priority = torch.full((n_features, n), -torch.inf, dtype=torch.float64)
        self.rows = torch.full((n_features, n), -1, dtype=torch.int64)
        self.values = torch.zeros(n_features, n)
        self.pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.n_pending = 0

    def add_(self, latent: Tensor, row: Tensor, value: Tensor, priority: Tensor) -> None:
        """Offer entries: latent, row [m] int64, value [m] float32, priority [m] float64."""
        better = priority > self.priority[latent, -1]
        self.pending.append((latent[better], row[better], value[better], priority[better]))
        self.n_pending += int(better.sum())
        if self.n_pending > self.cap:
            self.merge_()

    def merge_(self) -> None:
        """Fold the pending entries into the buffer: each latent keeps its n best."""
        if not self.pending:
            return
        latent, row, value, priority = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending, self.n_pending = [], 0
        group = torch.cat([torch.arange(self.n_features).repeat_interleave(self.n), latent])
        pri = torch.cat([self.priority.reshape(-1), priority])
        rows = torch.cat([self.rows.reshape(-1), row])
        vals = torch.cat([self.values.reshape(-1), value])
        kept, rank = group_top_n(group, pri, self.n)
        g = group[kept]
        self.priority.fill_(-torch.inf)
        self.rows.fill_(-1)
        self.values.zero_()
        self.priority[g, rank], self.rows[g, rank], self.values[g, rank] = pri[kept], rows[kept], vals[kept]


def sample_keys(row: Tensor, latent: Tensor, seed: int) -> Tensor:
    """A pseudo-random priority in [0, 1) per (row, latent): the same whatever the batching."""
    mask = (1 << 31) - 1
    x = (row * 1103515245 + latent * 12345 + seed * 2654435761 + 1) & mask
    for _ in range(2):  # two rounds of an LCG and xorshift mix the three inputs
        x = (x * 1103515245 + 12345) & mask
        x = x ^ (x >> 13)
    return x.double() / mask


class LatentStats:
    """One encoding's statistics over the rows, for every latent, built batch by batch (`add_`)."""

    def __init__(self, n_features: int, contexts: int, seed: int):
        self.seed = seed
        self.count = torch.zeros(n_features, dtype=torch.int64)
        self.max = torch.zeros(n_features)
        self.hist = torch.zeros(n_features * BINS, dtype=torch.int64)
        self.top = TopN(n_features, contexts)
        self.sample = TopN(n_features, SAMPLES)
        # each row's nonzeros, row after row (batches of any width): latents, values, counts per row
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self.n_rows = 0

    def add_(self, codes: SparseCodes, first_row: int) -> None:
        """codes: [b, k] of store rows first_row .. first_row + b - 1 (any k; zeros are not codes)."""
        b, k = codes.values.shape
        self.n_rows += b
        nz = codes.values.reshape(-1) > 0
        latent = codes.indices.reshape(-1)[nz].long()
        value = codes.values.reshape(-1)[nz].float()
        self._parts.append((latent.to(torch.int32), value, (codes.values > 0).sum(1)))
        row = (torch.arange(b).repeat_interleave(k) + first_row)[nz]
        self.count += torch.bincount(latent, minlength=len(self.count))
        self.max.scatter_reduce_(0, latent, value, "amax")
        bins = (value.log2() * BINS_PER_OCTAVE).floor().long().clamp(-BINS // 2, BINS // 2 - 1) + BINS // 2
        self.hist.index_add_(0, latent * BINS + bins, torch.ones_like(bins))
        self.top.add_(latent, row, value, value.double())
        self.sample.add_(latent, row, value, sample_keys(row, latent, self.seed))

    def finish_(self) -> None:
        """After the last batch: the buffers merged, the codes in one piece."""
        self.top.merge_()
        self.sample.merge_()
        latents, values, counts = (torch.cat(p).numpy() for p in zip(*self._parts)) if self._parts else ([],) * 3
        self._latents, self._values = np.asarray(latents, np.int32), np.asarray(values, np.float32)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._parts = []

    def value_at(self, first_row: int, rows: Tensor, latent: int) -> Tensor:
        """The latent's value at store rows [m] (NaN outside the rows seen)."""
        out = np.full(len(rows), np.nan, np.float32)
        for j, r in enumerate(rows.tolist()):
            local = r - first_row
            if 0 <= local < self.n_rows:
                lo, hi = self._starts[local], self._starts[local + 1]
                out[j] = self._values[lo:hi][self._latents[lo:hi] == latent].sum()
        return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# What a page shows
# --------------------------------------------------------------------------------------------


class Context(NamedTuple):
    """A window of tokens around one row."""

    row: int
    """The store row the window is centred on (the latent's value there is `value`)."""
    value: float
    tokens: list[str]
    """The window's tokens, decoded one by one (or 'id 123' without a tokenizer)."""
    acts: list[float]
    """The latent's value at each token (NaN: the row is outside the dashboard's rows)."""
    centre: int
    """Index of the row itself in `tokens`."""


class EncodingView(NamedTuple):
    """One latent under one encoding."""

    name: str
    density: float
    max: float
    hist: list[tuple[float, int]]
    """(lower bin edge, count) over the latent's nonzero bins."""
    top: list[Context]
    samples: list[tuple[str, list[Context]]]
    """(quantile band, contexts) from the lower bands."""


class LatentPage(NamedTuple):
    latent: int
    views: list[EncodingView]
    """The encoder's view, then the pursuit codes' (with --codes)."""
    logits: tuple[list[tuple[str, float]], list[tuple[str, float]]] | None
    """(top positive, top negative) logit effects; None when the model is not loaded."""
    nearest: list[tuple[int, float]]
    """(latent, decoder cosine similarity), nearest first."""

    @property
    def overlap(self) -> float | None:
        """Fraction of the encoder's top rows that are also the pursuit codes' top rows."""
        if len(self.views) < 2:
            return None
        a, b = ({c.row for c in v.top} for v in self.views)
        return len(a & b) / max(len(a), 1)


class Vocab(NamedTuple):
    """Token id -> text, with the reason when there is no tokenizer."""

    decode: Any
    note: str


def _vocab(model: Any, note: str) -> Vocab:
    tok = getattr(model, "tokenizer", None) if model is not None else None
    if tok is None:
        return Vocab(lambda i: f"id {i}", note or "the model has no tokenizer: token ids are shown")
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tok.decode([i])
        return cache[i]

    return Vocab(decode, "")


def _load_model(cfg: DashboardConfig, store: Any) -> tuple[Any, str]:
    """The store's model (or --model) on the CPU, or None and why not: the site is built without it."""
    from saekit.models import load_model  # lazy: it imports transformer-lens

    try:
        spec = cfg.model or store_model_spec(store, fix="pass --model to show decoded tokens and logit effects")
        return load_model(spec, torch.device("cpu"), torch.float32).model, ""
    except Exception as e:  # any failure to load only drops the panels that need the model
        return None, f"the model could not be loaded ({one_line(e)}): token ids are shown and logit effects are omitted"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class DashboardResult(NamedTuple):
    out: Path
    index: Path
    latents: list[int]
    pages: list[LatentPage]
    note: str
    """Why tokens are ids and logit effects are missing ('' when the model loaded)."""


def run(cfg: DashboardConfig) -> DashboardResult:
    """Build the site for `cfg` in cfg.out."""
    device = resolve_device(cfg.device)
    with output_dir(
        cfg.out, kept="the pages written so far", rerun="rerun the same command into an empty --out"
    ) as out:
        if is_non_empty(out):
            raise SaekitError(f"--out {out} already exists and is not empty: choose a new --out")
        return _run(cfg, out, device)


def _run(cfg: DashboardConfig, out: Path, device: torch.device) -> DashboardResult:
    from saekit.dashboard.html import write_site  # lazy: only writing the site needs it

    store = open_store(cfg.store, cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb)
    check_has_tokens(store, "the dashboard has no token contexts to show")
    hook = store.resolve_hook(cfg.hook)
    sae = load_sae(cfg.sae, device)
    check_sae_fits_hook(sae, cfg.sae, store.d_model(hook), hook)
    wanted = parse_latents(cfg.latents)
    if wanted and wanted[-1] >= sae.n_features:
        raise SaekitError(f"--latents {wanted[-1]} is not a latent of {cfg.sae}: its ids are 0..{sae.n_features - 1}")
    rows = _rows(cfg, store, sae)
    codes = _open_codes(cfg, store, hook, sae, rows)
    stats = stream_stats(cfg, store, hook, sae, rows, codes, device)
    chosen = choose_latents(cfg, stats[0].count, sae.n_features)
    model, note = _load_model(cfg, store)
    names = ["encoder", codes[1] if codes else ""]
    pages, vocab = latent_pages(cfg, store, sae, stats, names, rows, chosen, model, note)
    index = write_site(out, pages, header=_header(cfg, store, hook, sae, rows, codes), note=vocab.note)
    return DashboardResult(out, index, chosen, pages, vocab.note)


def latent_pages(
    cfg, store, sae, stats: list[LatentStats], names: list[str], rows: range, chosen: list[int], model: Any, note: str
) -> tuple[list[LatentPage], Vocab]:
    """What each chosen latent's page shows, from the pass's statistics (and the model, if any)."""
    vocab = _vocab(model, note)
    W = sae.decoder.raw_dictionary()[0].detach().float().cpu()
    logits = logit_effects(W[chosen], model) if model is not None and _fits(model, W) else None
    near = nearest_latents(W, chosen)
    pages = []
    with one_thread():  # many tiny reads and ops per context
        for j, i in enumerate(chosen):
            views = [_view(cfg, store, s, names[n], i, rows.start, vocab) for n, s in enumerate(stats)]
            lg: Any = None
            if logits is not None:
                lg = tuple([(vocab.decode(int(t)), float(v)) for t, v in zip(*side)] for side in logits[j])
            pages.append(LatentPage(i, views, lg, near[j]))
    return pages, vocab


def _rows(cfg: DashboardConfig, store: Any, sae: Any) -> range:
    held = sae_held_out(store, sae, cfg.sae).rows
    if not len(held):
        raise SaekitError(f"the store's {store.n_rows} rows are too few to hold any out: harvest more tokens")
    if cfg.rows > len(held):
        raise SaekitError(
            f"--rows {cfg.rows} is more than the store's {len(held)} held-out rows: pass at most {len(held)}"
        )
    return range(held.start, held.start + (cfg.rows or len(held)))


def _open_codes(cfg: DashboardConfig, store: Any, hook: str, sae: Any, rows: range) -> tuple[Any, str] | None:
    """(the --codes store, its group) once they are known to be this store's, hook's and
    dictionary's codes, and to cover `rows`; None without --codes."""
    if not cfg.codes:
        return None
    codes = open_codes_for(cfg.codes, f"codes in {cfg.codes}", store, hook, sae, f"--sae {cfg.sae}")
    group = cfg.group or (group_name("gp", int(sae.k)) if sae.k else "")
    if group not in codes.groups:
        raise SaekitError(
            f"codes in {cfg.codes} have no group {group or '(no --group given)'!r}; pass --group, one of: {', '.join(codes.groups)}"
        )
    first = codes.start_row
    if rows.start < first or rows.stop > first + codes.n_rows:
        raise SaekitError(
            f"codes in {cfg.codes} cover store rows [{first}, {first + codes.n_rows}) but the dashboard shows rows "
            f"[{rows.start}, {rows.stop}): run `saekit pursue` over the held-out rows, or pass --rows {max(first + codes.n_rows - rows.start, 0)}"
        )
    return codes, group


@contextmanager
def one_thread() -> Iterator[None]:
    """The statistics' small ops on one thread: a second one only adds wake-up waits, and on a busy
    machine it spin-waits for a core another process holds (measured: 2x the whole pass)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream_stats(cfg, store, hook, sae, rows: range, codes, device) -> list[LatentStats]:
    """The one pass over `rows`: the encoder's statistics, and with `codes` (store, group) theirs."""
    n = sae.n_features
    stats = [LatentStats(n, cfg.contexts, cfg.seed) for _ in range(2 if codes else 1)]
    bar = tqdm(
        total=len(rows), unit="row", unit_scale=True, desc="dashboard", disable=not cfg.progress, dynamic_ncols=True
    )
    start = rows.start
    for x in store.iter_rows(hook, cfg.batch_size, rows.start, rows.stop):
        c = encode(x.to(device).float(), ENCODER, None, sae)
        with one_thread():
            stats[0].add_(SparseCodes(c.indices.cpu(), c.values.cpu()), start)
            if codes:
                store_codes, group = codes
                first = start - store_codes.start_row
                stats[1].add_(store_codes.codes(group, first, first + len(x)), start)
        start += len(x)
        bar.update(len(x))
    bar.close()
    for s in stats:
        s.finish_()
    return stats


def choose_latents(cfg: DashboardConfig, count: Tensor, n_features: int) -> list[int]:
    """--latents, the --top most often active, --random (seeded), or every latent."""
    if cfg.latents:
        return parse_latents(cfg.latents)
    if cfg.top:
        return sorted(count.argsort(descending=True, stable=True)[: cfg.top].tolist())
    if cfg.random:
        return sorted(random.Random(cfg.seed).sample(range(n_features), min(cfg.random, n_features)))
    return list(range(n_features))


def _fits(model: Any, W: Tensor) -> bool:
    return getattr(model, "W_U", None) is not None and model.W_U.shape[0] == W.shape[1]


def logit_effects(W: Tensor, model: Any, n: int = 10, chunk: int = 1024) -> list[tuple[tuple, tuple]]:
    """W: [m, d] decoder rows -> per row ((top token ids, values), (bottom ids, values)) of W @ W_U."""
    W_U = model.W_U.detach().float().cpu()
    out = []
    for s in range(0, len(W), chunk):
        eff = W[s : s + chunk] @ W_U
        hi, lo = eff.topk(min(n, eff.shape[1])), (-eff).topk(min(n, eff.shape[1]))
        for j in range(len(eff)):
            out.append(((hi.indices[j], hi.values[j]), (lo.indices[j], -lo.values[j])))
    return out


def nearest_latents(W: Tensor, chosen: list[int], n: int = 5, chunk: int = 1024) -> list[list[tuple[int, float]]]:
    """W: [n_features, d] -> for each chosen latent, its n nearest others by decoder cosine similarity."""
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx = torch.tensor(chosen, dtype=torch.long)
    out = []
    for s in range(0, len(idx), chunk):
        sim = unit[idx[s : s + chunk]] @ unit.T
        sim[torch.arange(len(sim)), idx[s : s + chunk]] = -torch.inf  # not itself
        top = sim.topk(min(n, len(W) - 1))
        out += [list(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]
    return out


def _view(cfg, store, stats: LatentStats, name: str, latent: int, first_row: int, vocab: Vocab) -> EncodingView:
    count = int(stats.count[latent])
    hist = stats.hist[latent * BINS : (latent + 1) * BINS]
    bins = [(2 ** ((b - BINS // 2) / BINS_PER_OCTAVE), int(hist[b])) for b in range(BINS) if hist[b]]
    top = _entries(stats.top, latent)
    return EncodingView(
        name,
        count / max(stats.n_rows, 1),
        float(stats.max[latent]),
        bins,
        [context(store, stats, latent, r, v, cfg.window, first_row, vocab) for r, v in top],
        _bands(cfg, store, stats, latent, first_row, vocab),
    )


def _entries(top: TopN, latent: int) -> list[tuple[int, float]]:
    rows, values = top.rows[latent], top.values[latent]
    return [(int(r), float(v)) for r, v in zip(rows, values) if r >= 0]


def _bands(
    cfg, store, stats: LatentStats, latent: int, first_row: int, vocab: Vocab
) -> list[tuple[str, list[Context]]]:
    """Up to 3 contexts from each of the lower three quartiles of the latent's sampled values."""
    sampled = sorted(_entries(stats.sample, latent), key=lambda rv: rv[1])
    q = len(sampled) / 4
    out = []
    for b, name in enumerate(["0-25%", "25-50%", "50-75%"]):
        band = sampled[int(b * q) : int((b + 1) * q)][:3]
        if band:
            out.append((name, [context(store, stats, latent, r, v, cfg.window, first_row, vocab) for r, v in band]))
    return out


def context(
    store, stats: LatentStats, latent: int, row: int, value: float, window: int, first_row: int, vocab: Vocab
) -> Context:
    """The tokens of `row`'s sequence within `window` rows of it (the store's positions tell where
    its sequence starts and ends), with the latent's value at each."""
    lo, hi = max(row - window, 0), min(row + window + 1, store.n_rows)
    pos = store.positions(lo, hi).long()
    offset = torch.arange(lo, hi) - row
    same = pos - int(pos[row - lo]) == offset  # rows of the same sequence
    run = torch.nonzero(same).flatten()
    a, b = int(run[0]), int(run[-1]) + 1
    ids = store.tokens(lo + a, lo + b).tolist()
    acts = stats.value_at(first_row, torch.arange(lo + a, lo + b), latent).tolist()
    return Context(row, value, [vocab.decode(int(i)) for i in ids], acts, row - lo - a)


def _header(cfg, store, hook, sae, rows: range, codes) -> dict[str, str]:
    return {
        "store": str(cfg.store),
        "hook": hook,
        "sae": str(cfg.sae),
        "latents": str(sae.n_features),
        "store rows": f"{rows.start}..{rows.stop - 1}",
        **({"codes": f"{cfg.codes}:{codes[1]}"} if codes else {}),
    }

"""The downstream measurement: what splicing reconstructions in at a hook does to a language model.

    tokens -> model, clean, once per batch: logits and the hook's activations
      -> each reconstruction callable: activations -> reconstruction -> spliced in at the hook
      -> logits -> CE and KL(clean || spliced) per token; FVU, L0, cossim on the spliced rows

`downstream_metrics(model, tokens, hook, reconstruct)` works for any transformer-lens model and any
SAE object (a saekit SparseAutoencoder, a sae-lens SAE, a callable). Each batch's clean logits are
shared by every reconstruction and by the baselines: zeros ("zero ablation") and, given a mean, the
mean activation ("mean ablation").

On a store (`store_sequences(...).evaluate(encodings)`, the one path `saekit eval` and `saekit
pursue --downstream` share): whole sequences are rebuilt from the store's token ids (BOS put back
when harvest skipped it; any other skip is refused), the model is loaded as the store records it,
and every encoding encodes the cached rows, checked on the first batch against the model's own
activations, so a wrong model or misaligned tokens fail instead of being measured.

Conventions (docs/eval.md gives the details and how they relate to SAELens's scores):
- A reconstruction replaces the hook's activations at positions >= `splice_from`; earlier
  positions keep their clean activations (saekit eval: the positions the store skipped).
- A token counts when it is predicted from a spliced position: positions [splice_from, ctx - 1),
  each predicting the next token; CE and KL average over the same tokens. Predictions from
  earlier positions cannot change (the model is causal) and are left out.
- CE loss recovered = (CE_ablation - CE) / (CE_ablation - CE_clean), each CE a mean over all
  counted tokens: a ratio of means, not a mean of per-batch ratios.
- KL(clean || spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)) per token, in nats.

Speed: at `blocks.L.hook_resid_pre` (`hook_resid_post`) a spliced pass starts at block L (L + 1)
from the spliced residual stream (transformer-lens `start_at_layer`); other hooks rerun the whole
model with a replacement hook. The vocabulary-sized logits are reduced batch by batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saekit.devices import device_clock
from saekit.encodings import Encoding, encode
from saekit.errors import SaekitError
from saekit.metrics import ReconstructionStats
from saekit.models import PASS_MODEL, LoadedModel, check_has_tokens, load_model, store_model_spec
from saekit.pursuit import SparseCodes, reconstruct

CLEAN, ZERO, MEAN = "clean", "zero ablation", "mean ablation"
# Relative error (||fresh - cached|| / ||cached||) allowed between the model's own activations and
# the cached rows on the first batch. bf16 rounding alone gives ~0.2%, a bf16 harvest against an
# fp32 rerun ~1%; another model or misaligned tokens give tens of percent.
MAX_ACTS_ERROR = 0.05
# Auto batch: sequences whose [batch, ctx, vocab] logits hold about this many floats (128 MiB).
LOGITS_BUDGET = 2**25
MAX_AUTO_BATCH = 64

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class Downstream(NamedTuple):
    """What splicing one reconstruction in at the hook does, over all counted tokens."""

    ce: float
    """Mean cross-entropy of the next token, in nats, with the reconstruction spliced in."""
    delta_ce: float
    """ce minus the clean model's ce."""
    ce_recovered_zero: float
    """(CE_zero - ce) / (CE_zero - CE_clean): 1 is as good as the clean model, 0 as bad as zeros."""
    ce_recovered_mean: float
    """The same against the mean ablation (nan without a mean)."""
    kl_mean: float
    """Mean over tokens of KL(clean || spliced), nats."""
    kl_p90: float
    """90th percentile over tokens of KL(clean || spliced)."""
    kl_p99: float
    """99th percentile over tokens of KL(clean || spliced)."""
    fvu: float
    """Fraction of variance of the encoded rows left unexplained (nan for the clean row)."""
    l0: float
    """Mean nonzero codes per row (nan when the encoding gives no codes)."""
    cossim: float
    """Mean cosine similarity of each row and its reconstruction."""
    seconds: float
    """Time spent on this row: encoding, the spliced forward pass and its reduction."""
    n_tokens: int
    """Tokens counted."""

    def as_json(self) -> dict:
        """Every field, NaN written as None (JSON null)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in self._asdict().items()}


class Reconstruction(NamedTuple):
    """What a reconstruction callable may return instead of a bare tensor (as `SparseAutoencoder`'s
    forward does, which has these two fields among others)."""

    reconstruction: Tensor
    """[rows, d] the reconstructed activations."""
    codes: Tensor | None
    """[rows, n] codes (or their k values per row): only nonzeros are counted, for L0."""


# --------------------------------------------------------------------------------------------
# The measurement, for any model, tokens, hook and reconstruction
# --------------------------------------------------------------------------------------------

# An encoding inside the loop: (x [rows, d] float32, the batch's sequence indices) -> a
# reconstruction [rows, d], or an object with .reconstruction (and .codes).
BatchEncoding = Callable[[Tensor, range], Any]


def downstream_metrics(
    model: Any,
    tokens: Tensor,
    hook: str,
    reconstruct: Callable[[Tensor], Any] | Mapping[str, Callable[[Tensor], Any]],
    *,
    acts: Tensor | None = None,
    splice_from: int = 1,
    mean: Tensor | None = None,
    batch_size: int = 0,
    from_hook: bool = True,
    progress: bool = False,
) -> dict[str, Downstream]:
    """What splicing reconstructions in at `hook` does to `model`'s next-token predictions.

    model: a transformer-lens HookedTransformer. tokens: [n_seq, ctx] token ids.
    reconstruct: x [rows, d] -> [rows, d], or an object with `.reconstruction` (and `.codes` for
    L0); or a dict name -> such callables. Any SAE object works as is: a saekit SparseAutoencoder,
    a sae-lens SAE, or e.g. `lambda x: sae.decode(sae.encode(x))`.
    acts: [n_seq, ctx - splice_from, d] what the callables encode (e.g. cached rows), checked
    against the model's own activations on the first batch; default: the model's own.
    splice_from: first position replaced; earlier ones keep their clean activations. Counted:
    predictions from positions [splice_from, ctx - 1). SAELens's convention is splice_from=0.
    mean: [d] adds a "mean ablation" row and `ce_recovered_mean`.
    from_hook: start spliced passes after a residual-stream hook (False: always a full forward).
    Returns name -> Downstream: "clean", "zero ablation", ("mean ablation"), then each callable
    ("reconstruction" for a single one).
    """
    named = dict(reconstruct) if isinstance(reconstruct, Mapping) else {"reconstruction": reconstruct}
    encodings = {name: _ignore_rows(fn) for name, fn in named.items()}
    read_acts = None
    if acts is not None:
        n, ctx = tokens.shape
        acts = acts.reshape(n, ctx - splice_from, -1)
        read_acts = lambda seqs: acts[seqs.start : seqs.stop]
    return evaluate_encodings(
        model,
        tokens,
        hook,
        encodings,
        read_acts=read_acts,
        splice_from=splice_from,
        mean=mean,
        batch_size=batch_size,
        from_hook=from_hook,
        progress=progress,
    )


def _ignore_rows(fn: Callable[[Tensor], Any]) -> BatchEncoding:
    return lambda x, seqs: fn(x)


def evaluate_encodings(
    model: Any,
    tokens: Tensor,
    hook: str,
    encodings: Mapping[str, BatchEncoding],
    *,
    read_acts: Callable[[range], Tensor] | None,
    splice_from: int,
    mean: Tensor | None,
    batch_size: int,
    from_hook: bool,
    progress: bool,
) -> dict[str, Downstream]:
    """`downstream_metrics` with encodings that also get each batch's sequence indices (e.g. to
    look up stored codes) and `read_acts(seqs)` -> [len(seqs), ctx - splice_from, d] per batch."""
    splicer = Splicer(model, hook, tokens, splice_from, from_hook)
    baselines: dict[str, BatchEncoding] = {ZERO: lambda x, seqs: torch.zeros_like(x)}
    if mean is not None:
        row = mean.to(splicer.device, torch.float32).reshape(1, -1)
        baselines[MEAN] = lambda x, seqs: row.expand_as(x)
    taken = sorted(set(encodings) & {CLEAN, *baselines})
    if taken:
        raise SaekitError(f"encoding name {taken[0]!r} is taken by a baseline row: rename it")
    fns = {**baselines, **encodings}
    tallies = {name: _Tally() for name in [CLEAN, *fns]}
    n = tokens.shape[0]
    step = batch_size or max(1, min(MAX_AUTO_BATCH, LOGITS_BUDGET // (tokens.shape[1] * model.cfg.d_vocab)))
    with (
        tqdm(total=n, unit="seq", desc="eval", disable=not progress, dynamic_ncols=True) as bar,
        torch.inference_mode(),
    ):
        for lo in range(0, n, step):
            seqs = range(lo, min(n, lo + step))
            acts = read_acts(seqs) if read_acts is not None else None
            _evaluate_batch(splicer, tokens[seqs.start : seqs.stop], seqs, acts, fns, tallies, check=lo == 0)
            bar.update(len(seqs))
    clean, zero = tallies[CLEAN].ce(), tallies[ZERO].ce()
    mean_ce = tallies[MEAN].ce() if MEAN in tallies else math.nan
    return {name: t.result(clean, zero, mean_ce) for name, t in tallies.items()}


def rerun_layer(hook: str, n_layers: int) -> int | None:
    """The block a forward pass can start at from `hook`'s activations: blocks.L.hook_resid_pre
    -> L, blocks.L.hook_resid_post -> L + 1; None for any other hook."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if m is None or int(m[1]) >= n_layers:
        return None
    return int(m[1]) + (m[2] == "post")


class Splicer:
    """Runs `model` clean and with activations replaced at `hook` (from `splice_from` on)."""

    def __init__(self, model: Any, hook: str, tokens: Tensor, splice_from: int, from_hook: bool):
        if hook not in model.hook_dict:
            raise SaekitError(f"model {model.cfg.model_name} has no hook {hook!r}: pass a hook of this model")
        if tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise SaekitError(f"tokens must be [n_seq, ctx] token ids, got {tuple(tokens.shape)} {tokens.dtype}")
        if not 0 <= splice_from < tokens.shape[1] - 1:
            raise SaekitError(
                f"splice_from={splice_from} leaves no prediction to count in {tokens.shape[1]}-token sequences"
            )
        self.model, self.hook, self.splice_from = model, hook, splice_from
        self.device = torch.device(model.cfg.device)
        shortformer = model.cfg.positional_embedding_type == "shortformer"  # needs its pos embed at every block
        self.start_layer = rerun_layer(hook, model.cfg.n_layers) if from_hook and not shortformer else None
        tok = model.tokenizer
        # as harvest: left-padding tokenizers make transformer-lens infer a mask from pad tokens
        self.left_padded = tok is not None and tok.padding_side == "left"

    def _kwargs(self, tokens: Tensor) -> dict:
        return {"attention_mask": torch.ones_like(tokens)} if self.left_padded else {}

    def clean(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [b, ctx] -> (logits [b, ctx, vocab], the hook's activations [b, ctx, ...])."""
        grabbed = {}

        def grab(act: Tensor, hook: Any) -> None:
            grabbed["act"] = act.clone()

        logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, grab)], **self._kwargs(tokens))
        return logits, grabbed["act"]

    def spliced(self, tokens: Tensor, clean_act: Tensor, x_hat: Tensor) -> Tensor:
        """Logits [b, ctx, vocab] with x_hat [b * (ctx - splice_from), d] at positions >= splice_from."""
        act = clean_act.clone()
        act[:, self.splice_from :] = x_hat.reshape(act[:, self.splice_from :].shape).to(act.dtype)
        if self.start_layer is not None:
            return self.model(act, start_at_layer=self.start_layer, **self._kwargs(tokens))
        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook, lambda a, hook: act)], **self._kwargs(tokens))


def _evaluate_batch(
    splicer: Splicer,
    tokens: Tensor,
    seqs: range,
    acts: Tensor | None,
    fns: Mapping[str, BatchEncoding],
    tallies: dict[str, _Tally],
    check: bool,
) -> None:
    s, device = splicer.splice_from, splicer.device
    tokens = tokens.to(device)
    targets = tokens[:, s + 1 :]
    t0 = device_clock(device)
    logits, clean_act = splicer.clean(tokens)
    clean = _Predictions(logits, s)
    ce = clean.ce(targets)
    tallies[CLEAN].add(ce, torch.zeros_like(ce), device_clock(device) - t0)
    fresh = clean_act[:, s:].flatten(2)  # [b, ctx - s, d]
    if acts is not None:
        acts = acts.to(device)
        if check:
            _check_acts(fresh, acts, splicer.hook)
    x = (fresh if acts is None else acts).reshape(-1, fresh.shape[-1]).float()
    for name, fn in fns.items():
        t0 = device_clock(device)
        x_hat, codes = _unpack(fn(x, seqs), x, name)
        spliced = _Predictions(splicer.spliced(tokens, clean_act, x_hat), s)
        tallies[name].add(spliced.ce(targets), clean.kl_to(spliced), device_clock(device) - t0, x, x_hat, codes)


class _Predictions:
    """The counted next-token predictions of one forward pass. CE and KL come from the logits and
    their logsumexp, without log-softmax tensors: half the vocabulary-sized passes per row."""

    def __init__(self, logits: Tensor, s: int):
        self.logits = logits[:, s:-1].float()  # [b, t, vocab], t = ctx - 1 - s
        self.lse = torch.logsumexp(self.logits, dim=-1)  # [b, t]
        self._probs: Tensor | None = None

    def ce(self, targets: Tensor) -> Tensor:
        """Cross-entropy of targets [b, t] -> [b, t] nats."""
        return self.lse - self.logits.gather(-1, targets[..., None]).squeeze(-1)

    def kl_to(self, other: _Predictions) -> Tensor:
        """KL(self || other) per token [b, t], as sum_v p (logits - other.logits) + (other.lse - lse)
        sum_v p: exactly 0 where the logits are equal."""
        if self._probs is None:  # computed once, shared by every row of the batch
            self._probs = torch.exp(self.logits - self.lse[..., None])
            self._mass = self._probs.sum(-1)
        return torch.linalg.vecdot(self._probs, self.logits - other.logits) + (other.lse - self.lse) * self._mass


def _check_acts(fresh: Tensor, acts: Tensor, hook: str) -> None:
    """Refuse to evaluate rows that are not this model's activations on these tokens."""
    if fresh.shape != acts.shape:
        raise SaekitError(
            f"the activations given have shape {tuple(acts.shape)} per batch but the model's at {hook} have {tuple(fresh.shape)}"
        )
    err = float((fresh.float() - acts.float()).norm() / acts.float().norm().clamp_min(1e-30))
    if not err <= MAX_ACTS_ERROR:
        raise SaekitError(
            f"the model's own activations at {hook} differ from the cached ones by {err:.1%} on the first sequences: "
            "the model is not the one that produced them (saekit eval: pass that one with --model) or the tokens are not theirs"
        )


def _unpack(out: Any, x: Tensor, name: str) -> tuple[Tensor, Tensor | None]:
    """(reconstruction [rows, d], codes or None) from what an encoding returned."""
    rec = out if isinstance(out, Tensor) else getattr(out, "reconstruction", None)
    if not isinstance(rec, Tensor) or rec.shape != x.shape:
        got = tuple(rec.shape) if isinstance(rec, Tensor) else type(out).__name__
        raise SaekitError(
            f"encoding {name!r} returned {got} for inputs {tuple(x.shape)}: return a reconstruction of the same shape"
        )
    codes = None if isinstance(out, Tensor) else getattr(out, "codes", None)
    return rec.float(), codes


class _Tally:
    """One row's sums over all batches: CE, per-token KL (kept for percentiles), reconstruction."""

    def __init__(self) -> None:
        self.ce_sum, self.n, self.seconds = 0.0, 0, 0.0
        self.kl: list[Tensor] = []
        self.recon: ReconstructionStats | None = None

    def add(
        self,
        ce: Tensor,
        kl: Tensor,
        seconds: float,
        x: Tensor | None = None,
        x_hat: Tensor | None = None,
        codes: Tensor | None = None,
    ) -> None:
        self.ce_sum += float(ce.double().sum())
        self.n += ce.numel()
        self.kl.append(kl.flatten().cpu())
        self.seconds += seconds
        if x is not None and x_hat is not None:
            self.recon = self.recon or ReconstructionStats()
            self.recon.update(x, x_hat, codes)

    def ce(self) -> float:
        return self.ce_sum / self.n

    def result(self, clean: float, zero: float, mean: float) -> Downstream:
        kl = torch.cat(self.kl).double().numpy()
        p90, p99 = np.percentile(kl, [90, 99])
        r = self.recon.compute() if self.recon is not None else None
        ce = self.ce()
        return Downstream(
            ce=ce,
            delta_ce=ce - clean,
            ce_recovered_zero=_recovered(zero, ce, clean),
            ce_recovered_mean=_recovered(mean, ce, clean),
            kl_mean=float(kl.mean()),
            kl_p90=float(p90),
            kl_p99=float(p99),
            fvu=r.fvu if r else math.nan,
            l0=r.l0 if r else math.nan,
            cossim=r.cossim if r else math.nan,
            seconds=self.seconds,
            n_tokens=self.n,
        )


def _recovered(ablation: float, ce: float, clean: float) -> float:
    """(CE_ablation - ce) / (CE_ablation - CE_clean); nan when the ablation costs nothing."""
    gap = ablation - clean
    return (ablation - ce) / gap if gap != 0 and not math.isnan(gap) else math.nan


# --------------------------------------------------------------------------------------------
# On a store's whole sequences (saekit eval, saekit pursue --downstream)
# --------------------------------------------------------------------------------------------

# What a user of `saekit eval` does about a store whose model cannot be loaded or does not fit.


class SequenceLayout(NamedTuple):
    """How a harvested store's rows form sequences: sequence i holds rows [i * per_seq, (i + 1) * per_seq)."""

    ctx_len: int
    """Tokens per sequence, BOS included."""
    skip: int
    """Leading positions of each sequence the store left out (0, or 1 for the BOS position)."""
    bos_id: int | None
    """Token at position 0 of every sequence (None: the model takes no BOS)."""

    @property
    def per_seq(self) -> int:
        return self.ctx_len - self.skip

    def rows(self, seqs: range) -> range:
        """The store rows of sequences `seqs`."""
        return range(seqs.start * self.per_seq, seqs.stop * self.per_seq)

    def within(self, rows: range) -> range:
        """The whole sequences inside store rows `rows` (empty when they hold none)."""
        first, stop = -(-max(rows.start, 0) // self.per_seq), rows.stop // self.per_seq
        return range(first, max(first, stop))


def sequence_layout(store: Any) -> SequenceLayout:
    """The store's sequences, when its token ids rebuild them exactly; else one line saying why not."""
    check_has_tokens(store, "CE and KL cannot be measured on it")
    meta = store.meta
    ctx, skip, bos = meta.get("ctx_len"), meta.get("skip_first_n_tokens"), meta.get("bos_id")
    if not (_is_int(ctx) and _is_int(skip) and 0 <= skip < ctx) or not (bos is None or _is_int(bos)):
        raise SaekitError(
            f"store {store.path} does not record how its rows form sequences (ctx_len, skip_first_n_tokens, bos_id): "
            "CE and KL rerun the model on the sequences `saekit harvest` cached; pass a store it wrote"
        )
    if skip > 1 or (skip == 1 and bos is None):
        what = f"the first {skip} tokens" if skip > 1 else "the first token (not a BOS token: the model takes none)"
        raise SaekitError(
            f"store {store.path} left out {what} of every sequence and keeps no ids for them, so its sequences "
            "cannot be rebuilt to rerun the model: harvest with --skip-first-n-tokens 0, or 1 for a model with a BOS token"
        )
    return SequenceLayout(ctx, skip, bos)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sequence_tokens(store: Any, layout: SequenceLayout, seqs: range) -> Tensor:
    """Token ids [len(seqs), ctx_len] of whole sequences, rebuilt from the store's rows (BOS put back)."""
    per = layout.per_seq
    r0, r1 = seqs.start * per, seqs.stop * per
    positions = store.positions(r0, r1).reshape(-1, per)
    if not bool((positions == torch.arange(layout.skip, layout.ctx_len, dtype=positions.dtype)).all()):
        raise SaekitError(
            f"rows {r0}..{r1 - 1} of store {store.path} are not whole sequences (their positions do not run "
            f"{layout.skip}..{layout.ctx_len - 1}): it was not laid out by `saekit harvest`"
        )
    tokens = store.tokens(r0, r1).long().reshape(-1, per)
    if layout.skip and layout.bos_id is not None:  # sequence_layout refuses a skip without a BOS token
        tokens = torch.cat([torch.full((len(seqs), 1), layout.bos_id, dtype=torch.long), tokens], dim=1)
    return tokens


def check_model(lm: LoadedModel, hook: str, layout: SequenceLayout, tokens: Tensor, fix: str = PASS_MODEL) -> None:
    """One line when the loaded model cannot be the one that harvested the store."""
    cfg = lm.model.cfg
    if hook not in lm.model.hook_dict:
        raise SaekitError(f"model {lm.name} has no hook {hook!r}: it is not the store's model; {fix}")
    if layout.ctx_len > cfg.n_ctx:
        raise SaekitError(
            f"the store's sequences have {layout.ctx_len} tokens but model {lm.name} takes {cfg.n_ctx}: {fix}"
        )
    if int(tokens.max()) >= cfg.d_vocab:
        raise SaekitError(
            f"the store's token ids reach {int(tokens.max())} but model {lm.name} has {cfg.d_vocab} tokens: {fix}"
        )


class StoreSequences(NamedTuple):
    """Whole sequences of a store and the model that harvested them, checked and ready to splice into."""

    store: Any
    """The activation store (its cached rows are what every encoding encodes)."""
    hook: str
    layout: SequenceLayout
    seqs: range
    """The sequences, by index in the store."""
    tokens: Tensor
    """[len(seqs), ctx_len] their token ids."""
    model: LoadedModel

    def describe(self) -> dict[str, str]:
        """For a report's header: the sequences, their rows, the spliced positions and the counted predictions."""
        s, rows, ctx = self.seqs, self.layout.rows(self.seqs), self.layout.ctx_len
        return {
            "sequences": f"{s.start}..{s.stop - 1} ({len(s)} of {ctx} tokens)",
            "rows": f"{rows.start}..{rows.stop - 1}",
            "spliced positions": f"{self.layout.skip}..{ctx - 1}",
            "counted predictions": f"from positions {self.layout.skip}..{ctx - 2}",
        }

    def evaluate(
        self, encodings: Mapping[str, BatchEncoding], batch_size: int = 0, progress: bool = False
    ) -> dict[str, Downstream]:
        """`evaluate_encodings` on these sequences: each encoding encodes the cached rows of a batch's
        sequences (its `seqs` count from 0, the first sequence here); the store's mean is the mean ablation."""
        per, row0 = self.layout.per_seq, self.layout.rows(self.seqs).start
        read = lambda s: self.store.rows(self.hook, row0 + s.start * per, row0 + s.stop * per).reshape(len(s), per, -1)
        return evaluate_encodings(
            self.model.model,
            self.tokens,
            self.hook,
            encodings,
            read_acts=read,
            splice_from=self.layout.skip,
            mean=self.store.stats(self.hook).mean,
            batch_size=batch_size,
            from_hook=True,
            progress=progress,
        )


def store_sequences(
    store: Any,
    hook: str,
    layout: SequenceLayout,
    seqs: range,
    device: torch.device,
    dtype: torch.dtype,
    model: str = "",
    fix: str = PASS_MODEL,
) -> StoreSequences:
    """The token ids of `seqs` and the store's model (or `model`), loaded and checked against the store;
    `fix` ends the line when the model cannot be loaded or does not fit."""
    tokens = sequence_tokens(store, layout, seqs)
    lm = load_model(model or store_model_spec(store, fix), device, dtype)
    check_model(lm, hook, layout, tokens, fix)
    return StoreSequences(store, hook, layout, seqs, tokens, lm)


def codes_encoding(codes: SparseCodes, W: Tensor, b: Tensor, per_seq: int) -> BatchEncoding:
    """An encoding from stored codes of every evaluated row, in order (codes [rows, k]; W [n, d],
    b [d] the raw-space dictionary): a batch decodes its sequences' rows."""

    def encode(x: Tensor, seqs: range) -> Reconstruction:
        lo, hi = seqs.start * per_seq, seqs.stop * per_seq
        c = SparseCodes(codes.indices[lo:hi].to(W.device), codes.values[lo:hi].to(W.device))
        return Reconstruction(reconstruct(c, W, b), c.values)

    return encode


def computed_encoding(sae: Any, W: Tensor, b: Tensor, method: Encoding, k: int | None, steps: int) -> BatchEncoding:
    """An encoding computed batch by batch (`saekit.encodings.encode`) and decoded against the
    raw-space dictionary (W [n, d], b [d]): the encoder's own output (method "encoder", k None),
    its codes at k (`encoder@k`), a pursuit method, or refit / encoder+gp (`steps`) from the
    encoder's codes at k."""

    def encoded(x: Tensor, seqs: range) -> Reconstruction:
        c = encode(x, method, k, sae, (W, b), refine=steps)
        return Reconstruction(reconstruct(c, W, b), c.values)

    return encoded

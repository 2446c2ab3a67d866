"""`TrainConfig`: what `saekit train` trains and how, with "0 means auto" resolved once (`resolve`)
before anything is built from it; and the learning-rate schedule.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

from saekit.config import check_dict, check_fraction, check_k, check_non_negative, check_positive, need
from saekit.measure.heldout import held_out_rows
from saekit.sae import SparseAutoencoder
from saekit.sae.architectures import TRAINABLE, architecture
from saekit.store.shard_cache import ShardCacheFields
from saekit.train.jumprelu import DEFAULT_L0_COEF, SPARSITY_LOSSES, JumpReLUTraining

CODES = ("encoder", "pursuit", "both")
MAX_UNROLL = 8
TRAIN_ACTIVATIONS = TRAINABLE

# Fields that must match the run being resumed: they decide the model, the loss and the data stream.
# Others (lr, budget, eval and logging cadence, device) may change on resume (then the result
# is no longer bitwise that of an uninterrupted run).
RUN_IDENTITY = (
    "hook",
    "n_features",
    "k",
    "activation",
    "matryoshka",
    "sparsity_loss",
    "l0_coef",
    "bandwidth",
    "tanh_scale",
    "pre_act_coef",
    "ste_to_input",
    "threshold_init",
    "d_hidden",
    "n_hidden",
    "unroll",
    "distill",
    "from_pretrained",
    "init_encoder",
    "train_decoder",
    "codes",
    "normalize",
    "batch_size",
    "seed",
    "eval_rows",
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(ShardCacheFields):
    """Everything `saekit train` needs; each field is also a CLI flag (`n_features` -> `--n-features`)."""

    store: str = ""
    """Activation store written by `saekit harvest` (a directory or an fsspec URL)."""
    out: str = ""
    """Run directory: config, metrics.jsonl, checkpoint/, and the final sae/ and sae_lens/. Must not exist unless --resume."""
    hook: str | None = None
    """Hook to train on; default: the store's only hook."""

    n_features: int = 0
    """Latents (dictionary atoms) of a new SAE; 0: expansion_factor x d_in. Taken from the dictionary with --from-pretrained."""
    expansion_factor: int = 0
    """n_features = expansion_factor x d_in when --n-features is 0; 0 means 8."""
    k: int = 32
    """Active latents per token (TopK), or per token on average over a batch (Batch-TopK); also pursuit's k."""
    activation: str = "topk"
    """'topk' or 'batchtopk' (batch-level selection in training, a learned threshold at inference)."""
    d_hidden: int = 0
    """Width of the encoder's MLP path (added to the linear path, starting at zero); 0: a linear encoder."""
    n_hidden: int = 0
    """Hidden layers of the MLP path; 0 means 1 when --d-hidden is set."""
    unroll: int = 0
    """Learned refinement steps after the TopK encoder (residual -> correlation -> learned step -> TopK), trained end to end; each costs one more matmul per row. 0: none."""
    from_pretrained: str = ""
    """Start from this dictionary: sae-lens RELEASE/ID, a local sae-lens dir, a saekit SAE dir or a saekit run dir."""
    init_encoder: bool | None = None
    """With --from-pretrained: start the encoder from that SAE's encoder (an MLP path starts at zero, so training starts at that SAE); --no-init-encoder starts from the decoder's transpose. Default: yes with --from-pretrained."""
    train_decoder: bool | None = None
    """Train the dictionary too; default: yes for a new SAE or pursuit codes, frozen for --from-pretrained with encoder codes."""
    matryoshka: str = ""
    """Matryoshka groups (Bussmann et al. 2025): sizes of nested latent groups, comma-separated, summing to n_features (64,128,320); each prefix's reconstruction loss is added. With --activation batchtopk."""
    sparsity_loss: str = ""
    """JumpReLU: 'step' (DeepMind's L0), 'tanh' (Anthropic's) or 'quadratic' (Gemma Scope 2's, pulling each row's L0 toward --k); default quadratic."""
    l0_coef: float = 0.0
    """JumpReLU: weight of the sparsity loss, in sae-lens's units; 0: the default of --sparsity-loss (see docs/train.md)."""
    l0_warmup_frac: float = 0.0
    """JumpReLU: fraction of the steps over which the sparsity weight rises linearly from 0."""
    bandwidth: float = 0.05
    """JumpReLU: width of the straight-through estimators' kernel (in normalized pre-activation units)."""
    tanh_scale: float = 4.0
    """JumpReLU with --sparsity-loss tanh: the scale inside the tanh."""
    pre_act_coef: float = 0.0
    """JumpReLU: weight of Anthropic's pre-activation loss on dead latents, in sae-lens's units (3e-6 in Anthropic's setup); 0 turns it off."""
    ste_to_input: bool | None = None
    """JumpReLU: the estimators' gradient also reaches the encoder, not only the thresholds (Anthropic's setup); default: on, but off with --sparsity-loss step (DeepMind's)."""
    threshold_init: float = 0.0
    """JumpReLU: every threshold's starting value; 0: the value at which a training row starts with about --k active latents."""
    codes: str = "encoder"
    """Codes the loss decodes: 'encoder', 'pursuit' (gradient pursuit against the current dictionary; trains only the dictionary) or 'both'."""
    normalize: bool = True
    """Center and scale a new SAE's inputs by the store's statistics (E||x||^2 = d_in); kept in the SAE, folded into the sae-lens export."""

    tokens: int = 0
    """Training budget in activations (rows); 0: one pass over the training rows."""
    batch_size: int = 4096
    """Rows per optimizer step, summed over all ranks."""
    lr: float = 0.0
    """Adam learning rate; 0: 2e-4 / sqrt(n_features / 16384)."""
    warmup_frac: float = 0.05
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    decay_frac: float = 0.2
    """Fraction of the steps, at the end, over which it falls linearly to 0."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (dead latents reconstruct the residual); 0 turns it off."""
    k_aux: int = 0
    """Dead latents the AuxK loss uses per token; 0: d_in // 2."""
    dead_tokens: int = 0
    """A latent is dead after this many tokens without firing; 0: min(10M, tokens // 10)."""
    distill: float = 0.0
    """Weight of the distillation term that pulls the encoder toward gradient pursuit's codes of the same rows (at --k); 0 turns it off."""
    distill_codes: str = ""
    """With --distill: read the pursuit codes from this `saekit pursue` --out (covering the training rows) instead of computing them each step."""
    distill_group: str = ""
    """With --distill-codes: the codes group to distill from; default gp_k<k> (gradient pursuit at --k)."""

    eval_rows: int = 0
    """Held-out rows at the end of the store (never trained on); 0: min(65536, rows // 10)."""
    eval_every: int = 0
    """Evaluate every N steps, and at the start and the end; 0: ten times per run."""
    log_every: int = 10
    """Write training loss to metrics.jsonl every N steps."""
    checkpoint_every: int = 1000
    """Checkpoint every N steps, and at the end; 0: only at the end."""
    seed: int = 0
    """Seed of the initialization and of the data order."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (or start it if it has none)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each rank takes its local GPU."""
    progress: bool = True
    """Show a progress bar."""
    wandb: bool = False
    """Also log to Weights & Biases (when the wandb package is installed)."""
    wandb_project: str = "saekit"
    """wandb project name."""

    def __post_init__(self) -> None:
        super().__post_init__()  # --cache-dir, --cache-gb
        need(bool(self.store), "--store is required: the activation store to train on")
        need(bool(self.out), "--out is required: the run directory to write")
        need(
            self.activation in TRAIN_ACTIVATIONS,
            f"--activation {self.activation!r}: use one of {', '.join(TRAIN_ACTIVATIONS)}",
        )
        need(self.codes in CODES, f"--codes {self.codes!r}: use one of {', '.join(CODES)}")
        check_positive("--k", self.k)
        check_non_negative("--n-features", self.n_features, "expansion_factor x d_in")
        check_non_negative("--expansion-factor", self.expansion_factor, "8")
        need(not (self.n_features and self.expansion_factor), "pass --n-features or --expansion-factor, not both")
        if self.n_features:  # else known once the store (or the pretrained dictionary) is open: `resolve`
            check_k(self.k, self.n_features, "--k", "--n-features")
        self._check_matryoshka()
        self._check_jumprelu()
        check_non_negative("--d-hidden", self.d_hidden, "a linear encoder")
        check_non_negative("--n-hidden", self.n_hidden, "1 with --d-hidden")
        need(
            not self.n_hidden or bool(self.d_hidden),
            f"--n-hidden {self.n_hidden} needs --d-hidden (the MLP's hidden width)",
        )
        need(
            not self.init_encoder or bool(self.from_pretrained),  # None: the default, decided in `resolve`
            "--init-encoder needs --from-pretrained (the SAE whose encoder to start from)",
        )
        need(
            not (self.codes == "pursuit" and self.train_decoder is False),
            "--codes pursuit trains only the dictionary: drop --no-train-decoder",
        )
        self._check_amortised()
        self._check_budget()

    def _check_matryoshka(self) -> None:
        if not self.matryoshka:
            return
        groups = matryoshka_groups(self.matryoshka)
        need(
            architecture(self.activation).name == "batchtopk",
            f"--matryoshka trains a Matryoshka Batch-TopK SAE: add --activation batchtopk (not {self.activation})",
        )
        need(self.codes == "encoder", "--matryoshka is a loss on the encoder's codes: drop --codes")
        if self.n_features:
            check_groups_sum(groups, self.n_features)

    def _check_jumprelu(self) -> None:
        jumprelu = architecture(self.activation).learns_threshold
        need(
            jumprelu or not (self.sparsity_loss or self.l0_coef or self.pre_act_coef or self.ste_to_input is not None),
            "--sparsity-loss, --l0-coef, --pre-act-coef and --ste-to-input train a JumpReLU SAE: add --activation jumprelu",
        )
        need(
            not self.sparsity_loss or self.sparsity_loss in SPARSITY_LOSSES,
            f"--sparsity-loss {self.sparsity_loss!r}: use one of {', '.join(SPARSITY_LOSSES)}",
        )
        check_non_negative("--l0-coef", self.l0_coef, "the default of --sparsity-loss")
        check_fraction("--l0-warmup-frac", self.l0_warmup_frac)
        need(
            self.bandwidth > 0, f"--bandwidth {self.bandwidth} must be > 0 (the estimators divide by it; 0.05 is usual)"
        )
        check_positive("--tanh-scale", self.tanh_scale)
        check_non_negative("--pre-act-coef", self.pre_act_coef, "off")
        check_non_negative("--threshold-init", self.threshold_init, "the value that starts at L0 --k")
        need(
            not jumprelu or self.codes == "encoder",
            "--activation jumprelu trains the encoder's thresholds: drop --codes",
        )

    def _check_amortised(self) -> None:
        """The refinement steps and distillation."""
        need(
            0 <= self.unroll <= MAX_UNROLL,
            f"--unroll {self.unroll} must be in 0..{MAX_UNROLL} (each step costs one more matmul per row; 1-3 are typical)",
        )
        need(
            not self.unroll or architecture(self.activation).fixed_k,
            "--unroll refines TopK codes (exactly k per row): use --activation topk",
        )
        check_non_negative("--distill", self.distill, "no distillation")
        need(
            not self.distill or self.codes != "pursuit",
            "--distill trains the encoder, which --codes pursuit leaves alone: use --codes encoder or both",
        )
        need(not self.distill_codes or self.distill > 0, "--distill-codes needs --distill C > 0 (the term's weight)")
        need(not self.distill_group or bool(self.distill_codes), "--distill-group needs --distill-codes")

    def _check_budget(self) -> None:
        """The budget, optimizer, loss and cadence settings."""
        check_non_negative("--tokens", self.tokens, "one pass over the store")
        check_positive("--batch-size", self.batch_size)
        check_non_negative("--lr", self.lr, "auto")
        check_fraction("--warmup-frac", self.warmup_frac)
        check_fraction("--decay-frac", self.decay_frac)
        need(self.warmup_frac + self.decay_frac <= 1, "--warmup-frac plus --decay-frac must be <= 1")
        check_non_negative("--auxk-coef", self.auxk_coef, "no AuxK loss")
        check_non_negative("--k-aux", self.k_aux, "d_in // 2")
        check_non_negative("--dead-tokens", self.dead_tokens, "min(10M, tokens // 10)")
        check_non_negative("--eval-rows", self.eval_rows, "min(65536, rows // 10)")
        check_non_negative("--eval-every", self.eval_every, "ten times per run")
        check_non_negative("--checkpoint-every", self.checkpoint_every, "only at the end")
        check_positive("--log-every", self.log_every)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Strict: an unknown key or a value of the wrong type is an error naming it."""
        return cls(**cls.check_dict(d, source))

    @classmethod
    def check_dict(cls, d: dict[str, Any], source: str) -> dict[str, Any]:
        """`d` with keys as field names and values of the fields' types (`saekit.config.check_dict`)."""
        return check_dict(cls, d, source, "saekit train --help")


def resolve(
    cfg: TrainConfig, *, hook: str, d_in: int, n_rows: int, pretrained: SparseAutoencoder | None = None
) -> TrainConfig:
    """Fill the 0-means-auto fields from the store (its hook, d_in and rows) and from `pretrained`
    (the --from-pretrained dictionary), and check what they decide. `build_sae` builds from the
    result, and it is saved as config.json."""
    n_features = _n_features(cfg, hook, d_in, pretrained)
    check_k(cfg.k, n_features, "--k", "n_features")
    if cfg.matryoshka:
        check_groups_sum(matryoshka_groups(cfg.matryoshka), n_features)
    held = held_out_rows(n_rows, cfg.eval_rows)
    eval_rows, train_rows = len(held), held.start
    need(
        eval_rows > 0 and train_rows > 0,
        f"--eval-rows {eval_rows} leaves no training or no held-out rows in the store's {n_rows}; change it",
    )
    tokens = cfg.tokens or train_rows
    need(
        tokens >= cfg.batch_size,
        f"--tokens {tokens} is less than one batch of {cfg.batch_size} rows; raise --tokens or lower --batch-size",
    )
    steps = tokens // cfg.batch_size
    need(
        not cfg.distill_codes or not trains_decoder(cfg),
        "--distill-codes were computed against a fixed dictionary, but this run trains its dictionary: "
        "use --from-pretrained with the encoder codes (and no --train-decoder), or drop --distill-codes to compute them each step",
    )
    return replace(
        cfg,
        hook=hook,
        n_features=n_features,
        expansion_factor=0,
        n_hidden=cfg.n_hidden or (1 if cfg.d_hidden else 0),
        train_decoder=trains_decoder(cfg),
        init_encoder=bool(cfg.from_pretrained) if cfg.init_encoder is None else cfg.init_encoder,
        tokens=tokens,
        lr=cfg.lr or 2e-4 / math.sqrt(n_features / 2**14),
        k_aux=cfg.k_aux or max(1, d_in // 2),
        dead_tokens=cfg.dead_tokens or max(1, min(10_000_000, tokens // 10)),
        eval_rows=eval_rows,
        eval_every=cfg.eval_every or max(1, steps // 10),
        resume=False,  # how a run was started is not part of what it is
    )


def jumprelu_training(cfg: TrainConfig) -> JumpReLUTraining | None:
    """The JumpReLU loss settings of a resolved config; None for another activation."""
    if not architecture(cfg.activation).learns_threshold:
        return None
    mode = cfg.sparsity_loss or "quadratic"
    return JumpReLUTraining(
        mode=mode,
        bandwidth=cfg.bandwidth,
        l0_coef=cfg.l0_coef or DEFAULT_L0_COEF[mode],
        target_l0=float(cfg.k),
        tanh_scale=cfg.tanh_scale,
        pre_act_coef=cfg.pre_act_coef,
        ste_to_input=mode != "step" if cfg.ste_to_input is None else cfg.ste_to_input,
    )


def matryoshka_groups(text: str) -> tuple[int, ...]:
    """'64,128,320' -> (64, 128, 320): the sizes of the nested groups, each a positive whole number."""
    parts = [p.strip() for p in text.split(",")]
    need(
        all(p.isdigit() and int(p) > 0 for p in parts),
        f"--matryoshka {text!r}: give the group sizes as positive whole numbers separated by commas, e.g. 64,128,320",
    )
    return tuple(int(p) for p in parts)


def matryoshka_prefixes(text: str) -> tuple[int, ...]:
    """The widths of the inner prefixes whose losses are added: the running sums of the groups but
    the last (the whole dictionary, whose loss is the main one); () without --matryoshka."""
    if not text:
        return ()
    widths = list(itertools.accumulate(matryoshka_groups(text)))
    return tuple(widths[:-1])


def check_groups_sum(groups: tuple[int, ...], n_features: int) -> None:
    need(
        sum(groups) == n_features,
        f"--matryoshka groups sum to {sum(groups)}, not n_features {n_features}: make the last group {n_features - sum(groups[:-1])}"
        if n_features > sum(groups[:-1])
        else f"--matryoshka groups sum to {sum(groups)}, not n_features {n_features}: make them add up to it",
    )


def _n_features(cfg: TrainConfig, hook: str, d_in: int, pretrained: SparseAutoencoder | None) -> int:
    """The dictionary's size: the pretrained one's, or --n-features, or expansion_factor x d_in."""
    if pretrained is None:
        return cfg.n_features or (cfg.expansion_factor or 8) * d_in
    src, n = cfg.from_pretrained, pretrained.n_features
    need(
        pretrained.d_in == d_in,
        f"--from-pretrained {src} has d_in={pretrained.d_in} but hook {hook} has d_model={d_in}: use the dictionary trained on this hook",
    )
    need(
        cfg.n_features in (0, n),
        f"--n-features {cfg.n_features} differs from the pretrained dictionary's {n}: drop --n-features",
    )
    return n


def trains_decoder(cfg: TrainConfig) -> bool:
    if cfg.train_decoder is not None:
        return cfg.train_decoder
    return not cfg.from_pretrained or cfg.codes != "encoder"


def lr_at(step: int, total: int, lr: float, warmup_frac: float, decay_frac: float) -> float:
    """Learning rate of 0-based `step` of `total`: linear warm-up, constant, linear decay to 0."""
    warm, decay = int(total * warmup_frac), int(total * decay_frac)
    if warm and step < warm:
        return lr * (step + 1) / warm
    if decay and step >= total - decay:
        return lr * (total - step) / decay
    return lr

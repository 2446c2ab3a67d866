"""The SparseAutoencoder: an `Encoder` (linear, plus an optional MLP path) and a `Decoder` (the dictionary).

Shapes: `x` is `[..., d_in]` (usually `[batch, d_in]`), codes are dense `[..., n_features]` in the
parameters' dtype (float32 unless you ask for another). Inputs of any float dtype (e.g. the cache's
bf16) are cast to the parameters' dtype first.

Spaces. The dictionary lives in a *normalized* space: `x_n = (x - input_mean) * input_scale`.
Both buffers sit on the `Decoder` (they define the space its atoms live in, so a decoder handed to a
new encoder keeps them) and are the identity unless `set_input_normalization` sets them from the
cache's statistics. `SparseAutoencoder.encode` takes raw activations and `decode` returns raw
activations; `Decoder.raw_dictionary()` gives the equivalent raw-space atoms for pursuit code.

The parts (config, activations, normalization, `Encoder`, `Decoder`) live in `saekit.sae.parts`
and are importable from here. Loading sae-lens SAEs (`from_pretrained`, `from_sae_lens`) and exporting to sae-lens
(`export_sae_lens`) are methods here, implemented in `saekit.sae.lens_io`. `load_sae(spec)` at the
bottom is the one loader for every kind of SAE (run dir, saekit dir, sae-lens dir or release).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from saekit.atomic import is_regular
from saekit.devices import dtype_name, resolve_dtype
from saekit.errors import SaekitError, file_kind, one_line

# the parts' public names, importable from here as well (`from saekit.sae import Decoder, ...`)
from saekit.sae import lens_io as sae_lens_io
from saekit.sae.architectures import Architecture
from saekit.sae.files import ENCODER_STALE as ENCODER_STALE
from saekit.sae.files import SAE_LENS_CONFIG, SAE_LENS_WEIGHTS, publish_dir, read_json_object
from saekit.sae.parts import ACTIVATIONS as ACTIVATIONS
from saekit.sae.parts import Decoder, Encoder, Normalization, SAEConfig, check_last_dim, normalization_from_stats
from saekit.sae.parts import Dictionary as Dictionary
from saekit.sae.parts import EncoderOutput as EncoderOutput
from saekit.sae.parts import batch_topk_activation as batch_topk_activation
from saekit.sae.parts import jumprelu_activation as jumprelu_activation
from saekit.sae.parts import topk_activation as topk_activation

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "saekit-sae"
FORMAT_VERSION = 1


class ForwardOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns."""

    codes: torch.Tensor
    """[..., n_features] sparse codes (dense tensor, mostly zeros), parameters' dtype."""
    pre_acts: torch.Tensor
    """[..., n_features] encoder pre-activations (before TopK/ReLU), for the AuxK dead-latent loss."""
    reconstruction: torch.Tensor
    """[..., d_in] reconstruction in raw activation space (comparable with the input x)."""
    sae_in: torch.Tensor
    """[..., d_in] the input in the dictionary's normalized space (equals x without normalization)."""
    sae_out: torch.Tensor
    """[..., d_in] the reconstruction in the normalized space: codes @ W_dec + b_dec. Train on
    (sae_out - sae_in) so the loss scale does not depend on the activations' scale."""


# --------------------------------------------------------------------------------------------
# The SAE
# --------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """An `Encoder` and a `Decoder`.

    Build it from sizes, from a decoder (a new encoder over an existing dictionary), or from an
    encoder and a decoder:

        SparseAutoencoder(d_in=768, n_features=24576, k=32)
        SparseAutoencoder(decoder=pretrained.decoder, k=100, d_hidden=1024, n_hidden=2, device="cuda")
        SparseAutoencoder(encoder=enc, decoder=dec)

    A new encoder's linear path starts as the decoder's transpose; an MLP path starts at zero.
    `n_unroll` (TopK) adds that many learned refinement steps against the dictionary (see `Encoder`).
    `activation` defaults to 'topk' when k is given; pass 'batchtopk' or 'relu' otherwise.
    `normalize_activations` is the original sae-kit's argument: False (its default) is accepted,
    True raises (see `set_input_normalization`).
    """

    def __init__(
        self,
        d_in: int | None = None,
        n_features: int | None = None,
        k: float | None = None,
        d_hidden: int | None = None,
        n_hidden: int = 0,
        apply_preencoder_bias: bool = True,
        dtype: torch.dtype | str | None = None,
        device: Any = None,
        encoder: Encoder | None = None,
        decoder: Decoder | None = None,
        normalize_activations: bool = False,
        *,
        activation: str | None = None,
        threshold_lr: float = 0.01,
        metadata: dict | None = None,
        n_unroll: int = 0,
    ):
        super().__init__()
        if normalize_activations:
            raise SaekitError(
                "normalize_activations=True (the original sae-kit's per-token rescaling in forward) is not supported: "
                "saekit normalizes with the activation cache's statistics; call sae.set_input_normalization(mean, mean_sq_norm), "
                "as saekit train --normalize does"
            )
        self.metadata: dict = dict(metadata or {})
        if encoder is not None:
            if k is not None or activation is not None or d_hidden is not None or n_hidden or n_unroll:
                raise SaekitError(
                    "k, activation, d_hidden, n_hidden and n_unroll describe a new encoder, but you passed one: drop them or drop encoder="
                )
            if decoder is None:
                decoder = _decoder_from_encoder(encoder)
            _check_encoder_fits_decoder(encoder, decoder, d_in, n_features)
        else:
            if decoder is None:
                if d_in is None or n_features is None:
                    raise SaekitError("give d_in and n_features (and k), or a decoder=, or an encoder= and decoder=")
                decoder = Decoder(n_features, d_in, dtype=resolve_dtype(dtype), device=device)
            else:
                _check_encoder_fits_decoder(None, decoder, d_in, n_features)
            if activation is None and k is None:
                raise SaekitError("a new encoder needs k (TopK), or activation='relu' / 'batchtopk' with k")
            cfg = SAEConfig(
                d_in=decoder.d_in,
                n_features=decoder.n_features,
                activation=activation or "topk",
                k=k,
                d_hidden=d_hidden,
                n_hidden=n_hidden,
                n_unroll=n_unroll,
                apply_preencoder_bias=apply_preencoder_bias,
                threshold_lr=threshold_lr,
                dtype=dtype_name(decoder.dtype),
            )
            encoder = _new_encoder(cfg, decoder)
        if device is not None:
            decoder.to(device)
            encoder.to(device)
        self.encoder = encoder
        self.decoder = decoder

    # ---- the original sae-kit attributes, read from the modules so they never go stale ----
    @property
    def d_in(self) -> int:
        return self.decoder.d_in

    @property
    def n_features(self) -> int:
        return self.decoder.n_features

    @property
    def k(self) -> float | None:
        return self.encoder.k

    @property
    def activation(self) -> str:
        return self.encoder.activation

    @property
    def arch(self) -> Architecture:
        """What its activation is and allows (`saekit.sae.architectures`)."""
        return self.encoder.arch

    @property
    def d_hidden(self) -> int | None:
        return self.encoder.d_hidden

    @property
    def n_hidden(self) -> int:
        return self.encoder.n_hidden

    @property
    def n_unroll(self) -> int:
        return self.encoder.n_unroll

    @property
    def apply_preencoder_bias(self) -> bool:
        return self.encoder.apply_preencoder_bias

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def config(self) -> SAEConfig:
        """Everything needed to rebuild it (saved as config.json): its encoder's, in the SAE's dtype, with its metadata."""
        return replace(self.encoder.config, dtype=dtype_name(self.dtype), metadata=dict(self.metadata))

    @classmethod
    def from_config(cls, cfg: SAEConfig, device: Any = None) -> SparseAutoencoder:
        """A new SAE as `cfg` says: a fresh dictionary, and an encoder starting as its transpose."""
        decoder = Decoder(cfg.n_features, cfg.d_in, dtype=resolve_dtype(cfg.dtype), device=device)
        return cls(encoder=_new_encoder(cfg, decoder), decoder=decoder, metadata=cfg.metadata)

    # ---- computation ----
    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """x: [..., d_in] raw activations -> ForwardOutput (codes, pre_acts, reconstruction, sae_in, sae_out)."""
        check_last_dim(x, self.d_in, "inputs", "d_in")
        sae_in = self.decoder.normalize(x)
        codes, pre = self.encoder(sae_in, self.decoder.b_dec, self.decoder.W_dec)
        sae_out = self.decoder.decode_normalized(codes)
        recon = self.decoder.denormalize(sae_out)
        return ForwardOutput(codes, pre, recon, sae_in, sae_out)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] raw activations -> codes [..., n_features] (dense, mostly zeros)."""
        check_last_dim(x, self.d_in, "inputs", "d_in")
        return self.encoder(self.decoder.normalize(x), self.decoder.b_dec, self.decoder.W_dec).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [..., n_features] -> [..., d_in] reconstruction in raw activation space."""
        return self.decoder.decode(codes)

    @torch.no_grad()
    def calibrate_threshold_(self, x: torch.Tensor) -> float:
        """Batch-TopK: set the inference threshold so that the rows x [rows, d_in] (raw activations)
        keep k latents each on average, as batch-level selection does; returns the threshold.

        It sits halfway between the (k·rows)-th and the next largest positive pre-activation. This
        replaces the running estimate, which trails behind the encoder in short runs.
        """
        if not self.arch.calibrates:
            raise SaekitError(f"only Batch-TopK SAEs have a threshold to calibrate; this one is {self.activation}")
        check_last_dim(x, self.d_in, "inputs", "d_in")
        pre = self.encoder.pre_activations(self.decoder.normalize(x), self.decoder.b_dec).relu().flatten()
        m = int((self.k or 0) * x.shape[0])
        if not 0 < m < pre.numel():
            raise SaekitError(f"calibrating k={self.k} needs more than {x.shape[0]} rows; pass more rows")
        top = pre.float().topk(m + 1).values  # sorted, largest first
        threshold = float(top[m - 1] + top[m]) / 2
        self.encoder.threshold.fill_(threshold)
        return threshold

    def set_input_normalization(
        self, mean: torch.Tensor, mean_sq_norm: float, center: bool = True, scale: bool = True
    ) -> Normalization:
        """Center and/or scale inputs from the cache's statistics (mean [d_in], E||x||^2).

        Call it on a fresh SAE before training; it is stored in the decoder's buffers, kept by
        `save`, and folded into the weights by `export_sae_lens`.
        """
        norm = normalization_from_stats(mean, mean_sq_norm, center=center, scale=scale)
        if norm.mean.numel() != self.d_in:
            raise SaekitError(
                f"the statistics' mean has {norm.mean.numel()} entries but this SAE expects d_in={self.d_in}"
            )
        self.decoder.set_normalization_(norm.mean, norm.scale)
        return norm

    # ---- persistence ----
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `path/` with `sae.safetensors` and `config.json`. Refuses a non-empty `path` unless
        overwrite=True; the directory appears complete or not at all (written aside, then renamed)."""
        from safetensors.torch import save_file  # lazy: only reading or writing weights needs it

        path = Path(path)
        state = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **self.config.to_dict()}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

        publish_dir(path, write, overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "cpu") -> SparseAutoencoder:
        """Load a directory written by `save` (safetensors only: nothing is unpickled). Returns eval mode.

        For any kind of SAE (a run dir, a sae-lens dir or release) use `load_sae`.
        """
        path = Path(path)
        _refuse_non_regular(path, (CONFIG_FILE, WEIGHTS_FILE))
        cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_file.is_file():
            if (path / SAE_LENS_CONFIG).is_file():
                raise SaekitError(
                    f"{path} holds a sae-lens SAE, not a saekit one: use SparseAutoencoder.from_pretrained('{path}')"
                )
            raise SaekitError(
                f"{path} is not a saved saekit SAE (needs {CONFIG_FILE} and {WEIGHTS_FILE}): check the path"
            )
        if (path / "run.json").is_file():  # a training run's config.json is its training config
            unfinished = _unfinished_run(path)
            raise SaekitError(
                unfinished
                or f"{path} is a training run directory: load {path / 'sae'} (load_sae takes the run directory)"
            )
        if not weights_file.is_file():
            raise SaekitError(
                f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}: the weights file is missing; copy it next to {CONFIG_FILE} or re-save the SAE"
            )
        cfg = SAEConfig.from_dict(read_json_object(cfg_file, "a saekit SAE config"))
        sae = cls.from_config(cfg, device="meta")
        state = _read_weights(weights_file, device)
        expected = sae.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise SaekitError(
                f"{weights_file} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: it does not match {CONFIG_FILE}"
            )
        for key, t in expected.items():
            if state[key].shape != t.shape:
                raise SaekitError(
                    f"{weights_file} has {key} of shape {list(state[key].shape)} but {CONFIG_FILE} says {list(t.shape)}: "
                    "the two files belong to different SAEs; re-save the SAE"
                )
        # assign=True adopts the loaded tensors (no second copy on the device); unknown keys ignored.
        sae.load_state_dict({k: v for k, v in state.items() if k in expected}, assign=True)
        return sae.eval()

    # ---- sae-lens (implemented in saekit.sae.lens_io) ----
    @classmethod
    def from_pretrained(
        cls,
        release: str | os.PathLike,
        sae_id: str | None = None,
        device: Any = "cpu",
        k: int | None = None,
        d_hidden: int | None = None,
        n_hidden: int = 0,
    ) -> SparseAutoencoder:
        """Load a sae-lens SAE: a hub release + id (through `sae_lens.SAE.from_pretrained`), or a local
        directory holding `cfg.json` + `sae_weights.safetensors` (`release`, or `release/sae_id`).

        Standard (ReLU), TopK, Batch-TopK and JumpReLU SAEs keep their native activation; `k`
        replaces it with TopK(k). `d_hidden`/`n_hidden` add a zero-initialized MLP path. See
        `from_sae_lens` for how decoder norms are handled. Returns the SAE in eval mode.
        """

        return sae_lens_io.load_pretrained(cls, release, sae_id, device, k=k, d_hidden=d_hidden, n_hidden=n_hidden)

    @classmethod
    def from_sae_lens(
        cls, sl: Any, k: int | None = None, d_hidden: int | None = None, n_hidden: int = 0, device: Any = None
    ) -> SparseAutoencoder:
        """Convert an in-memory sae-lens SAE (standard, topk, batchtopk, jumprelu).

        saekit keeps decoder rows unit-norm, so row norms n_i are folded into the encoder
        (W_enc[:, i] *= n_i, b_enc[i] *= n_i, thresholds *= n_i): reconstructions are unchanged.
        SAEs trained with `rescale_acts_by_decoder_norm` (sae-lens TopK/Batch-TopK training) already
        measure codes this way, so their codes are identical too; for the others saekit's code i is
        sae-lens's times n_i (ReLU and JumpReLU are exact under this). A TopK SAE without that flag
        ranks latents by the rescaled pre-activations, which can change its selection when row norms
        differ: a warning says so.
        """

        return sae_lens_io.from_sae_lens(cls, sl, k=k, d_hidden=d_hidden, n_hidden=n_hidden, device=device)

    def export_sae_lens(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a directory that `sae_lens.SAE.load_from_disk(path)` opens with the same encode and
        decode outputs on raw activations (input normalization is folded into the weights).

        TopK -> sae-lens 'topk'; ReLU -> 'standard'; JumpReLU and Batch-TopK (its inference
        threshold) -> 'jumprelu'. MLP encoders have no sae-lens counterpart.
        """

        return sae_lens_io.export_sae_lens(self, path, overwrite)


def _check_encoder_fits_decoder(
    encoder: Encoder | None, decoder: Decoder, d_in: int | None, n_features: int | None
) -> None:
    if encoder is not None and encoder.d_in != decoder.d_in:
        raise SaekitError(
            f"encoder d_in={encoder.d_in} does not match decoder d_in={decoder.d_in}: they must read the same activations"
        )
    if encoder is not None and encoder.n_features != decoder.n_features:
        raise SaekitError(
            f"encoder n_features={encoder.n_features} does not match decoder n_features={decoder.n_features}"
        )
    if d_in is not None and d_in != decoder.d_in:
        raise SaekitError(
            f"d_in={d_in} does not match the decoder's d_in={decoder.d_in}: drop d_in= or pass a matching decoder"
        )
    if n_features is not None and n_features != decoder.n_features:
        raise SaekitError(f"n_features={n_features} does not match the decoder's n_features={decoder.n_features}")


def _new_encoder(cfg: SAEConfig, decoder: Decoder) -> Encoder:
    """A new encoder over `decoder` as `cfg` says: its linear path starts as the dictionary's transpose."""
    encoder = Encoder.from_config(cfg, decoder.device)
    with torch.no_grad():
        encoder.W_enc.copy_(decoder.W_dec.T)
    return encoder


def _decoder_from_encoder(encoder: Encoder) -> Decoder:
    decoder = Decoder(encoder.n_features, encoder.d_in, dtype=encoder.W_enc.dtype, device=encoder.W_enc.device)
    with torch.no_grad():
        decoder.W_dec.copy_(encoder.W_enc.T)
    decoder.normalize_rows_()
    return decoder


# --------------------------------------------------------------------------------------------
# Files, and the one loader for every kind of SAE
# --------------------------------------------------------------------------------------------


def _read_weights(file: Path, device: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on `device`; a damaged or unreadable file is one line."""
    from safetensors import SafetensorError  # lazy: only reading or writing weights needs it
    from safetensors.torch import load_file  # lazy: only reading or writing weights needs it

    try:
        return load_file(str(file), device=str(torch.device(device)))
    except SafetensorError as e:
        raise SaekitError(f"{file} is damaged ({one_line(e)}): re-save the SAE or copy the file again") from None
    except OSError as e:
        raise SaekitError(f"cannot read {file}: {e.strerror}") from None


def load_sae(spec: str | os.PathLike, device: Any = "cpu") -> SparseAutoencoder:
    """An SAE, in eval mode, from any of: a saekit training run dir (the SAE in its sae/), a saekit
    SAE dir (config.json + sae.safetensors), a local sae-lens dir (cfg.json +
    sae_weights.safetensors), or a sae-lens hub RELEASE/ID.

    `~` is expanded. A spec that names the local filesystem but is not a directory is an error,
    not a hub lookup. Every failure is one SaekitError line.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_sae_dir(path, device)
    if _looks_local(text):
        if path.exists():
            raise SaekitError(
                f"{text} is a file; pass the directory that holds the SAE (a run dir, a saekit or sae-lens SAE dir) or RELEASE/ID"
            )
        raise SaekitError(f"no SAE directory at {text}; pass a run dir, a saekit or sae-lens SAE dir, or RELEASE/ID")
    release, _, sae_id = text.partition("/")
    return SparseAutoencoder.from_pretrained(release, sae_id or None, device=device)


def check_sae_fits_hook(sae: SparseAutoencoder, spec: str, d_model: int, hook: str) -> None:
    """One line when `sae` (given as `spec`) cannot read a store's `hook` of width d_model; a
    warning when its metadata says it was trained on another hook."""
    if sae.d_in != d_model:
        raise SaekitError(
            f"SAE {spec} has d_in={sae.d_in} but hook {hook} of the store has d_model={d_model}; use an SAE trained on this hook"
        )
    meant = sae.metadata.get("hook_name") if isinstance(sae.metadata, dict) else None
    if meant and meant != hook:
        warnings.warn(f"SAE {spec} was trained on {meant}, not {hook}; the comparison may be meaningless", stacklevel=3)


def encoder_cost(sae: SparseAutoencoder | SAEConfig) -> float:
    """An encoder's cost per row in matmuls of the linear encoder's size (d_in x n_features).

    The linear path is 1; an MLP path adds its layers' multiply-adds over d_in * n_features
    (d_in*h + (n_hidden-1)*h*h + h*n_features for width h); each refinement step (n_unroll) adds
    1, its correlation with every atom. Not counted: TopK itself and the k-atom gathers
    (`decode_sparse`, k * d_in per row), both small next to a matmul when k << n_features.
    """
    cfg = sae.config if isinstance(sae, SparseAutoencoder) else sae
    d, n, h = cfg.d_in, cfg.n_features, cfg.d_hidden or 0
    mlp = d * h + (cfg.n_hidden - 1) * h * h + h * n if cfg.n_hidden > 0 else 0
    return 1 + mlp / (d * n) + cfg.n_unroll


def _unfinished_run(path: Path) -> str | None:
    """One line when `path` is a `saekit train` run directory with no final SAE yet (its run.json
    and config.json are there, its sae/ is not); None otherwise. The step of its last checkpoint
    is read from checkpoint/state.json where that can be read."""
    if not (path / "run.json").is_file() or (path / "sae").exists():
        return None
    try:
        steps = int(json.loads((path / "run.json").read_text())["steps"])
        done = int(json.loads((path / "checkpoint" / "state.json").read_text())["position"]["step"])
        where = f"its last checkpoint is step {done} of {steps}"
    except (OSError, ValueError, KeyError, TypeError):
        where = "it has no checkpoint yet"
    return (
        f"{path} is a training run that has not finished ({where}): "
        f"finish it with `saekit train --out {path} --resume`, or pass a finished run"
    )


def _load_sae_dir(path: Path, device: Any) -> SparseAutoencoder:
    unfinished = _unfinished_run(path)
    if unfinished:
        raise SaekitError(unfinished)
    if (path / "sae").is_dir():
        path = path / "sae"  # a training run directory (its own config.json is the training config)
    _refuse_non_regular(path, (CONFIG_FILE, WEIGHTS_FILE, SAE_LENS_CONFIG, SAE_LENS_WEIGHTS))
    saekit_cfg, lens_cfg = (path / CONFIG_FILE).is_file(), (path / SAE_LENS_CONFIG).is_file()
    if saekit_cfg and (
        not lens_cfg or read_json_object(path / CONFIG_FILE, "an SAE config").get("format") == FORMAT_NAME
    ):
        return SparseAutoencoder.load(path, device=device)
    if lens_cfg:
        return SparseAutoencoder.from_pretrained(path, None, device=device)
    raise SaekitError(
        f"no SAE in {path}: expected a saekit SAE ({CONFIG_FILE} + {WEIGHTS_FILE}), a sae-lens one "
        f"({SAE_LENS_CONFIG} + {SAE_LENS_WEIGHTS}), or a training run dir with sae/"
    )


def _refuse_non_regular(path: Path, names: tuple[str, ...]) -> None:
    """One line when an SAE file's name holds something that is not a regular file (a FIFO would
    block the read forever; a directory is no weights)."""
    for name in names:
        p = path / name
        if os.path.lexists(p) and not is_regular(p):
            mode = os.stat(p).st_mode if os.path.exists(p) else 0
            what = file_kind(mode) if mode and not stat.S_ISDIR(mode) else "not a regular file"
            raise SaekitError(f"{p} is {what}: an SAE's files are regular files; re-save the SAE or copy it again")


def _looks_local(spec: str) -> bool:
    """True for specs that name the local filesystem rather than a sae-lens RELEASE/ID."""
    first = spec.split("/", 1)[0]
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or (bool(first) and Path(first).is_dir())

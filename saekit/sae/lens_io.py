"""Conversion between saekit's `SparseAutoencoder` and sae-lens: loading sae-lens SAEs (hub
releases and local directories) and exporting to sae-lens's on-disk format.

The entry points are the SAE's own methods (`SparseAutoencoder.from_pretrained`,
`.from_sae_lens`, `.export_sae_lens`) and `saekit.sae.load_sae`; they call into this module.
sae-lens is imported inside the functions that need it, because it pulls in transformer-lens
(seconds of import time).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from saekit.devices import dtype_name
from saekit.errors import SaekitError, one_line
from saekit.sae.architectures import Architecture, TopK, sae_lens_loadable, sae_lens_native
from saekit.sae.files import ENCODER_STALE, SAE_LENS_CONFIG, SAE_LENS_WEIGHTS, publish_dir, read_json_object
from saekit.sae.parts import Decoder, Encoder

if TYPE_CHECKING:  # annotations only: saekit.sae calls this module, never the other way
    from saekit.sae import SparseAutoencoder

_LIST_RELEASES = (
    'list them with: python -c "from sae_lens.loading.pretrained_saes_directory import '
    'get_pretrained_saes_directory as d; print(list(d()))"'
)
# sae-lens config metadata kept in a loaded SAE's `metadata` (saekit's exports also write ENCODER_STALE)
_KEPT_METADATA = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    ENCODER_STALE,
    "store_hash",
    "trained_on",  # saekit.measure.heldout.TRAINED_ON: the rows that trained it travel with the export
)


# --------------------------------------------------------------------------------------------
# sae-lens -> saekit
# --------------------------------------------------------------------------------------------


def load_pretrained(
    cls: type[SparseAutoencoder],
    release: str | os.PathLike,
    sae_id: str | None = None,
    device: Any = "cpu",
    k: int | None = None,
    d_hidden: int | None = None,
    n_hidden: int = 0,
) -> SparseAutoencoder:
    """`SparseAutoencoder.from_pretrained`: a sae-lens SAE from the hub or a local directory."""
    sl = _load_sae_lens(release, sae_id, str(device))
    sae = from_sae_lens(cls, sl, k=k, d_hidden=d_hidden, n_hidden=n_hidden, device=device)
    sae.metadata.setdefault("source", {"release": str(release), "sae_id": sae_id})
    return sae


class _UnitRowWeights(NamedTuple):
    """A sae-lens SAE's weights with decoder rows rescaled to unit norm (norms folded into the
    encoder), as saekit keeps them."""

    W_enc: torch.Tensor  # [d_in, n]
    b_enc: torch.Tensor  # [n]
    W_dec: torch.Tensor  # [n, d_in], unit rows
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None  # [n] JumpReLU / Batch-TopK threshold in saekit's units
    rank: torch.Tensor | None  # [n] 1 / row norm where a TopK SAE ranks by its own pre-activations, else None


def from_sae_lens(
    cls: type[SparseAutoencoder],
    sl: Any,
    k: int | None = None,
    d_hidden: int | None = None,
    n_hidden: int = 0,
    device: Any = None,
) -> SparseAutoencoder:
    """`SparseAutoencoder.from_sae_lens`: convert an in-memory sae-lens SAE (see that method)."""
    native = _native_architecture(sl)
    weights = _unit_row_weights(sl, native, warn_batch=native.calibrates and k is None)
    activation = TopK.name if k is not None else native.name  # a k given replaces the activation with TopK(k)
    k_value = k if k is not None else (getattr(sl.cfg, "k", None) if native.has_k else None)
    decoder = Decoder(weights.W_dec.shape[0], weights.W_dec.shape[1], dtype=weights.W_dec.dtype, device="meta")
    encoder = Encoder(
        weights.W_enc.shape[0],
        weights.W_enc.shape[1],
        k_value,
        d_hidden,
        n_hidden,
        apply_preencoder_bias=bool(sl.cfg.apply_b_dec_to_input),
        dtype=weights.W_enc.dtype,
        device="meta",
        activation=activation,
        threshold_lr=float(getattr(sl.cfg, "topk_threshold_lr", 0.01)),
    )
    target = torch.device(device) if device is not None else weights.W_enc.device
    decoder.to_empty(device=target)
    encoder.to_empty(device=target)
    _copy_weights_(encoder, decoder, weights)
    if encoder.arch.fixed_k and native.fixed_k and weights.rank is not None:
        encoder.set_rank_scale_(weights.rank)  # it picks its latents as sae-lens does
    meta = getattr(sl.cfg, "metadata", None)
    keep = {key: getattr(meta, key, None) for key in _KEPT_METADATA}
    sae = cls(encoder=encoder, decoder=decoder, metadata={key: v for key, v in keep.items() if v is not None})
    return sae.eval()


def _native_architecture(sl: Any) -> Architecture:
    """saekit's architecture for a sae-lens SAE (`architectures.sae_lens_native`); refuses what saekit
    cannot load as is."""
    arch = sl.cfg.architecture()
    native = sae_lens_native(arch)
    if native is None:
        raise SaekitError(
            f"sae-lens architecture {arch!r} is not supported: saekit loads {', '.join(sae_lens_loadable())}"
        )
    norm_mode = getattr(sl.cfg, "normalize_activations", "none")
    if norm_mode == "expected_average_only_in":
        # sae-lens applies nothing at run time in this mode when the factor is unknown; match it.
        warnings.warn(
            "this sae-lens SAE expects inputs scaled by a factor sae-lens could not find; loaded without it, as sae-lens does",
            stacklevel=4,
        )
    elif norm_mode != "none":
        raise SaekitError(
            f"sae-lens normalize_activations={norm_mode!r} (a per-token transform) is not supported: saekit loads SAEs that take raw activations"
        )
    return native


@torch.no_grad()
def _unit_row_weights(sl: Any, native: Architecture, warn_batch: bool) -> _UnitRowWeights:
    """Copies of sl's weights with each decoder row's norm n_i folded into the encoder
    (W_enc[:, i] *= n_i, b_enc[i] *= n_i, threshold *= n_i unless sae-lens already measures codes
    that way). A TopK SAE that ranks by its own pre-activations (no rescale_acts_by_decoder_norm)
    with unequal norms gets `rank` = 1 / n_i, so saekit ranks as it does. warn_batch: say so when a
    Batch-TopK SAE's row norms differ (its batch-level selection in training can change)."""
    W_dec = sl.W_dec.detach().clone()
    norms = W_dec.norm(dim=1).clamp_min(1e-8)
    rescaled = bool(getattr(sl.cfg, "rescale_acts_by_decoder_norm", False))
    threshold = _sae_lens_threshold(sl)
    if threshold is not None and not rescaled:
        threshold = threshold * norms
    uneven = not rescaled and _uneven(norms)
    if warn_batch and uneven:
        warnings.warn(
            "decoder rows of this sae-lens Batch-TopK SAE have unequal norms; in training mode saekit ranks latents "
            "by pre-activation x row norm, so a few selections can differ (inference, by its threshold, is exact)",
            stacklevel=4,
        )
    return _UnitRowWeights(
        sl.W_enc.detach() * norms[None, :],
        sl.b_enc.detach() * norms,
        W_dec / norms[:, None],
        sl.b_dec.detach().clone(),
        threshold,
        1 / norms if uneven and native.fixed_k else None,
    )


@torch.no_grad()
def _copy_weights_(encoder: Encoder, decoder: Decoder, w: _UnitRowWeights) -> None:
    """Fill modules made on the meta device (then `to_empty`) with the converted weights."""
    decoder.W_dec.copy_(w.W_dec)
    decoder.b_dec.copy_(w.b_dec)
    decoder.input_mean.zero_()
    decoder.input_scale.fill_(1.0)
    encoder.W_enc.copy_(w.W_enc)
    encoder.b_enc.copy_(w.b_enc)
    encoder.threshold.copy_(w.threshold if w.threshold is not None else torch.zeros_like(w.b_enc))
    if encoder.arch.calibrates and w.threshold is None:
        encoder.threshold.fill_(math.nan)
    if encoder.mlp is not None:
        _reset_mlp_(encoder.mlp)


@torch.no_grad()
def _reset_mlp_(mlp: nn.Sequential) -> None:
    """Re-run default init after `to_empty` (meta tensors carry no values), last layer at zero."""
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for layer in linears[:-1]:
        layer.reset_parameters()
    nn.init.zeros_(linears[-1].weight)
    nn.init.zeros_(linears[-1].bias)


# --------------------------------------------------------------------------------------------
# saekit -> sae-lens
# --------------------------------------------------------------------------------------------


class FoldedWeights(NamedTuple):
    """A linear SAE's weights with the input normalization folded in (they take raw x)."""

    W_enc: torch.Tensor  # [d, n]
    b_enc: torch.Tensor  # [n]
    W_dec: torch.Tensor  # [n, d]
    b_dec: torch.Tensor  # [d]


def fold_normalization(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    mean: torch.Tensor,
    scale: float,
    apply_preencoder_bias: bool,
) -> FoldedWeights:
    """Fold x_n = (x - mean) * scale into a linear SAE so it takes raw x with *identical codes*.

    W_enc: [d, n], b_enc: [n], W_dec: [n, d], b_dec: [d], mean: [d].
    Encoder: (x_n - b_dec) @ W_enc = (x - b') @ (scale W_enc) with b' = mean + b_dec / scale.
    Decoder: (c @ W_dec + b_dec) / scale + mean = c @ (W_dec / scale) + b'.
    Decoder rows then have norm 1/scale: codes stay identical, which is what an exporter promises.
    """
    b_raw = mean + b_dec / scale
    W_enc_raw = W_enc * scale
    b_enc_raw = b_enc if apply_preencoder_bias else b_enc - (mean * scale) @ W_enc
    return FoldedWeights(W_enc_raw, b_enc_raw, W_dec / scale, b_raw)


def export_sae_lens(sae: SparseAutoencoder, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """`SparseAutoencoder.export_sae_lens`: write `path/` in sae-lens's format (see that method)."""
    if sae.encoder.mlp is not None:
        raise SaekitError(
            "MLP encoders exist only in saekit (sae-lens has no MLP-encoder architecture): use sae.save(path) instead"
        )
    if sae.n_unroll:
        raise SaekitError(
            "unrolled encoders (n_unroll > 0) exist only in saekit (sae-lens has no refinement steps): use sae.save(path) instead"
        )
    if sae.arch.calibrates and bool(sae.encoder.threshold.isnan().any()):
        raise SaekitError(
            "this Batch-TopK SAE has no inference threshold yet (it is estimated during training): train it before exporting"
        )
    sl = _to_sae_lens(sae)
    publish_dir(Path(path), sl.save_model, overwrite)
    return Path(path)


def _to_sae_lens(sae: SparseAutoencoder) -> Any:
    """An in-memory sae-lens SAE (on the CPU) computing what `sae` computes on raw activations."""
    import sae_lens  # noqa: F401 - registers sae-lens's own architectures
    from sae_lens.registry import get_sae_class  # lazy: sae-lens pulls in transformer-lens
    from sae_lens.saes.sae import SAEMetadata  # lazy: sae-lens pulls in transformer-lens

    dec, enc = sae.decoder, sae.encoder
    with torch.no_grad():
        folded = fold_normalization(
            enc.W_enc.float(),
            enc.b_enc.float(),
            dec.W_dec.float(),
            dec.b_dec.float(),
            dec.input_mean.float(),
            float(dec.input_scale),
            enc.apply_preencoder_bias,
        )
    common = {
        "d_in": sae.d_in,
        "d_sae": sae.n_features,
        "dtype": dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_preencoder_bias,
        "metadata": SAEMetadata(**{key: v for key, v in sae.metadata.items() if isinstance(key, str)}),
    }
    if enc.rank_scale is not None:  # unfold: sae-lens ranks by its own pre-activations, rows of norm 1 / rank
        r = enc.rank_scale.float()
        folded = FoldedWeights(folded.W_enc * r, folded.b_enc * r, folded.W_dec / r[:, None], folded.b_dec)
    sl_class, sl_config = get_sae_class(sae.arch.sae_lens_exports)  # the architecture's sae-lens inference class
    fixed = {"k": sae.encoder.k_per_row, "rescale_acts_by_decoder_norm": False} if sae.arch.fixed_k else {}
    sl = sl_class(sl_config(**fixed, **common))
    state = folded._asdict()
    if "threshold" in sl.state_dict():  # JumpReLU, Batch-TopK's inference form
        state["threshold"] = enc.threshold.float()
    sl.load_state_dict({key: v.detach().cpu().to(sl.dtype) for key, v in state.items()})
    return sl


# --------------------------------------------------------------------------------------------
# Reading sae-lens SAEs: local directories and the hub, every failure one line
# --------------------------------------------------------------------------------------------


def _uneven(norms: torch.Tensor) -> bool:
    return bool((norms.max() - norms.min()) > 1e-4 * norms.max())


def _sae_lens_threshold(sl: Any) -> torch.Tensor | None:
    """A sae-lens SAE's threshold [d_sae]: JumpReLU's per-latent one, or Batch-TopK's single
    `topk_threshold` for every latent; None for an SAE without one."""
    if isinstance(getattr(sl, "threshold", None), torch.Tensor):
        return sl.threshold.detach().clone().float().to(sl.W_enc.dtype)
    if isinstance(getattr(sl, "topk_threshold", None), torch.Tensor):
        value = sl.topk_threshold.detach().to(sl.W_enc.dtype)
        return value.expand(sl.cfg.d_sae).clone()
    return None


def _load_sae_lens(release: str | os.PathLike, sae_id: str | None, device: str) -> Any:
    """A sae-lens SAE from a local directory or the hub; every failure becomes one SaekitError line."""
    local = Path(release)
    if local.is_dir():
        folder = local / sae_id if sae_id and (local / sae_id / "cfg.json").is_file() else local
        if not (folder / "cfg.json").is_file():
            where = f"{local} or {local / sae_id}" if sae_id else str(local)
            raise SaekitError(f"no sae-lens SAE (cfg.json + sae_weights.safetensors) in {where}: check the path")
        return _load_sae_lens_dir(folder, device)

    import sae_lens  # lazy: sae-lens pulls in transformer-lens

    if not sae_id:
        raise SaekitError(
            f"sae-lens release {release!r} needs an SAE id: pass RELEASE/ID (e.g. gpt2-small-res-jb/blocks.8.hook_resid_pre); {_LIST_RELEASES}"
        )
    try:
        return sae_lens.SAE.from_pretrained(str(release), sae_id, device=device)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("Release"):
            raise SaekitError(f"unknown sae-lens release {str(release)!r}; {_LIST_RELEASES}") from None
        if msg.startswith("ID"):
            raise SaekitError(
                f'unknown SAE id {sae_id!r} in release {str(release)!r}; list its ids with: python -c "from '
                f"sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory as d; "
                f"print(list(d()['{release}'].saes_map))\""
            ) from None
        raise SaekitError(f"sae-lens could not load {release}/{sae_id}: {one_line(msg)}") from None
    except Exception as e:
        raise _hub_error(str(release), sae_id, e) from None


def _load_sae_lens_dir(folder: Path, device: str) -> Any:
    import sae_lens  # lazy: sae-lens pulls in transformer-lens
    from sae_lens.registry import SAE_CLASS_REGISTRY  # lazy: sae-lens pulls in transformer-lens

    cfg = read_json_object(folder / SAE_LENS_CONFIG, "a sae-lens SAE config")
    arch = cfg.get("architecture", "standard")
    if sae_lens_native(arch) is None:
        raise SaekitError(
            f"sae-lens architecture {arch!r} in {folder} is not supported: saekit loads {', '.join(sae_lens_loadable())}"
        )
    if not (folder / SAE_LENS_WEIGHTS).is_file():
        raise SaekitError(f"{folder} has {SAE_LENS_CONFIG} but no {SAE_LENS_WEIGHTS}: copy the weights next to it")
    _check_sae_lens_weights(folder, cfg)
    # Training-only architectures (batchtopk) load through TrainingSAE; the rest through SAE.
    loader = sae_lens.SAE if arch in SAE_CLASS_REGISTRY else sae_lens.TrainingSAE
    try:
        return loader.load_from_disk(str(folder), device=device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise SaekitError(f"sae-lens could not load {folder}: {one_line(e)}") from None


def _check_sae_lens_weights(folder: Path, cfg: dict) -> None:
    """Say plainly when the weights are damaged or do not match cfg.json (sae-lens reports either
    as a multi-line state_dict dump). Reads only the safetensors header."""
    from safetensors import SafetensorError, safe_open  # lazy: only reading or writing weights needs it

    weights = folder / SAE_LENS_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()  # a safetensors handle has no `in`
            shape = list(f.get_slice("W_dec").get_shape()) if "W_dec" in names else None
    except SafetensorError as e:
        raise SaekitError(f"{weights} is damaged ({one_line(e)}): download or copy it again") from None
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if shape is not None and shape != [d_sae, d_in]:
        raise SaekitError(
            f"{folder / SAE_LENS_CONFIG} says d_in={d_in}, d_sae={d_sae} but its weights have W_dec {shape} "
            f"(d_sae x d_in): the config does not belong to these weights"
        )


def _hub_error(release: str, sae_id: str | None, e: Exception) -> SaekitError:
    try:
        # lazy: only a failed hub download needs it
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub always ships with sae-lens
        GatedRepoError = LocalEntryNotFoundError = OfflineModeIsEnabled = RepositoryNotFoundError = ()  # type: ignore
    what = f"{release}/{sae_id}" if sae_id else release
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_network_error(e):
        return SaekitError(
            f"could not download SAE {what} from the Hugging Face hub (no network or hub unreachable): connect, or pass a local sae-lens directory"
        )
    if isinstance(e, GatedRepoError):
        return SaekitError(
            f"SAE {what} is in a gated Hugging Face repo: accept its terms on the hub and log in (huggingface-cli login)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return SaekitError(f"no Hugging Face repo for SAE {what}: check the release name; {_LIST_RELEASES}")
    return SaekitError(f"could not load SAE {what} through sae-lens: {type(e).__name__}: {one_line(e)}")


def _is_network_error(e: BaseException) -> bool:
    names = {type(c).__name__ for c in _causes(e)}
    return bool(
        names
        & {
            "ConnectionError",
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
            "gaierror",
            "NewConnectionError",
        }
    )


def _causes(e: BaseException | None):
    seen = 0
    while e is not None and seen < 10:
        yield e
        e = e.__cause__ or e.__context__
        seen += 1

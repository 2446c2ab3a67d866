"""The language models harvest and eval run: a transformer-lens name, a local HF checkpoint
folder (safetensors only), or the embedded default; their provenance; and their hook points.

A `LoadedModel` carries a `meta` dict (its provenance, stored in the cache's metadata) and a
short `name` (used in the default output path).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import re
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from saekit import embedded
from saekit.atomic import is_regular, read_regular
from saekit.devices import dtype_name
from saekit.embedded import EMBEDDED
from saekit.errors import SaekitError, file_kind, one_line, path_mode

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    """A HookedTransformer plus what identifies it."""

    model: Any
    """transformer_lens.HookedTransformer, in eval mode, on the requested device and dtype."""
    name: str
    """Short name for paths and logs ('gpt2', 'saekit-embedded', a checkpoint folder's name)."""
    meta: dict
    """Provenance: source kind, name or path, transformer-lens version, dtype, weights fingerprint."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """The identity of a model's weights: xxh3-128 (32 hex chars) over every parameter's name,
    shape, dtype and every byte of it, so any edit, even of one neuron's weights, changes it.

    A fast non-cryptographic hash: it tells checkpoints apart, it does not defend against a
    forged one. GPT-2 small (500 MB in fp32) costs a fraction of a second (bench/harvest.py).
    """
    import xxhash  # a dependency of datasets; lazy like the model libraries

    h = xxhash.xxh3_128()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        flat = p.detach().reshape(-1).to("cpu").contiguous()
        # bf16 has no numpy dtype: hash the raw 2-byte patterns.
        raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
        h.update(raw.numpy().data.cast("B"))
    return h.hexdigest()


def _tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # lazy: only provenance needs it

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet():
    """transformer-lens 3 warns that HookedTransformer is deprecated (for TransformerBridge) on
    every load; the HookedTransformer API is what saekit and the original README build on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*HookedTransformer.*")
        yield


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load `spec`: None/'embedded', a local HF checkpoint directory, or a transformer-lens name.

    transformer-lens prints its progress ("Moving model to device", "Loaded pretrained model")
    on stdout; it goes to stderr, so a command's stdout stays its result (`STORE=$(saekit harvest)`).
    """
    with contextlib.redirect_stdout(sys.stderr):
        return _load_model(spec, device, dtype)


def _load_model(spec: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    if spec in (None, "", EMBEDDED):
        return _load_embedded(device, dtype)
    mode = path_mode(Path(spec).expanduser(), "--model")
    if mode is not None and stat.S_ISDIR(mode):
        return _load_local_hf(Path(spec).expanduser().resolve(), device, dtype)
    if mode is not None and spec.lower() not in _official_names():
        raise SaekitError(
            f"--model {spec} is {file_kind(mode)}, not a checkpoint folder: pass the folder holding "
            "config.json, model.safetensors and the tokenizer (or a transformer-lens name)"
        )
    return _load_tl_name(spec, device, dtype)


def describe_model(model, name: str, meta: dict) -> LoadedModel:
    """`model` as it is (not even put in eval mode: it may be the caller's) with its provenance:
    `meta` plus transformer-lens version, dtype, shape and weights fingerprint."""
    meta = {
        **meta,
        "transformer_lens_version": _tl_version(),
        "dtype": dtype_name(model.cfg.dtype),
        "n_layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "n_ctx": model.cfg.n_ctx,
        "weights_fingerprint": weights_fingerprint(model),
    }
    return LoadedModel(model, name, meta)


def _finish(model, name: str, meta: dict) -> LoadedModel:
    model.eval()
    return describe_model(model, name, meta)


def _load_embedded(device, dtype) -> LoadedModel:
    model = embedded.load_embedded_model(device, dtype)
    return _finish(model, embedded.MODEL_NAME, {"source": "embedded", "name": embedded.MODEL_NAME})


def _official_names() -> dict[str, str]:
    """lower-cased name or alias -> official transformer-lens name."""
    from transformer_lens import loading_from_pretrained as loading  # lazy: transformer-lens takes seconds to import

    return loading.make_model_alias_map()


def _load_tl_name(spec: str, device, dtype) -> LoadedModel:
    from transformer_lens import HookedTransformer  # lazy: transformer-lens takes seconds to import

    names = _official_names()
    official = names.get(spec.lower())
    if official is None:
        close = difflib.get_close_matches(spec.lower(), list(names), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise SaekitError(
            f"unknown model '{spec}': not a transformer-lens model name nor a local checkpoint "
            f"directory{hint} (or use --model embedded)"
        )
    try:
        with _quiet():
            # Exactly what a user online would write; the weights come from the HF hub (or its cache).
            model = HookedTransformer.from_pretrained(spec, device=str(device), dtype=dtype)
    except (OSError, ConnectionError, ValueError) as e:
        raise SaekitError(
            f"could not load model '{spec}' from the Hugging Face hub ({one_line(e, 100)}): "
            "check the network, or pass a local checkpoint directory with --model"
        ) from e
    return _finish(model, official.split("/")[-1], {"source": "transformer_lens", "name": official})


def _load_local_hf(path: Path, device, dtype) -> LoadedModel:
    """A `save_pretrained` checkpoint directory (+ its tokenizer), loaded with no network access.

    Mirrors HookedTransformer.from_pretrained (same config conversion, weight conversion and
    processing: fold_ln, centered writing weights and unembed) but reads only `path`.
    """
    _check_checkpoint(path)
    try:
        with _quiet():
            model = _convert_local_hf(path, device, dtype)
    except SaekitError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, AttributeError, TypeError) as e:
        # transformer-lens's converters fail on configs they do not know with any of these
        raise SaekitError(
            f"could not load the checkpoint in {path} ({one_line(e, 100)}): transformer-lens supports GPT-2-style save_pretrained checkpoints"
        ) from e
    cfg_sha = hashlib.sha256(read_regular(path / "config.json")).hexdigest()[:16]
    return _finish(
        model,
        path.name,
        {
            "source": "hf_local",
            "path": str(path),
            "config_sha256": cfg_sha,
            "architecture": model.cfg.original_architecture,
        },
    )


# Files that carry a tokenizer's vocabulary; without one, AutoTokenizer builds an empty tokenizer
# from tokenizer_config.json alone and every text becomes unknown tokens.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_checkpoint(path: Path) -> None:
    """Refuse, one line each, what from_pretrained would fail on with a traceback or load wrongly."""
    config = path / "config.json"
    if not config.exists():
        raise SaekitError(f"--model {path} is a directory without config.json: pass a save_pretrained checkpoint")
    try:
        cfg = json.loads(read_regular(config))
    except ValueError as e:  # not JSON, or not UTF-8
        raise SaekitError(
            f"{config} is not JSON ({one_line(e, 60)}): save the checkpoint again with save_pretrained"
        ) from e
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise SaekitError(
            f"{config} has no model_type: it is not a transformers config; save the checkpoint with save_pretrained"
        )
    if cfg["model_type"] == "gpt2" and "n_ctx" not in cfg:
        raise SaekitError(
            f"{config} has no n_ctx, which transformer-lens reads for GPT-2 (the hub's gpt2 config carries it): "
            f'add "n_ctx": {cfg.get("n_positions", 1024)} (its n_positions) to it'
        )
    _check_weights(path)
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise SaekitError(
            f"--model {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
            f"save the model's tokenizer beside it with tokenizer.save_pretrained('{path}')"
        )


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; pickled weights are refused, never opened."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return [path / name for name in sorted(set(json.loads(read_regular(index))["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SaekitError(
                f"{index} is damaged ({one_line(e, 60)}): save the checkpoint again with save_pretrained"
            ) from e
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise SaekitError(
            f"saekit loads only safetensors weights, and {path} holds pickled ones ({', '.join(pickles)}), "
            "which can run code when loaded: re-save them with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    raise SaekitError(f"--model {path} has no model.safetensors: save the model there with save_pretrained")


def _check_weights(path: Path) -> None:
    """Open each weights file's header: a file cut short or overwritten fails here, by name."""
    from safetensors import SafetensorError, safe_open  # lazy: only reading or writing weights needs it

    for f in _weight_files(path):
        if f.exists() and not is_regular(f):
            raise SaekitError(
                f"weights file {f} is not a regular file: copy the checkpoint again or re-save it with save_pretrained"
            )
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SaekitError(
                f"weights file {f} is damaged or missing ({one_line(e, 80)}): "
                "copy the checkpoint again or re-save it with save_pretrained"
            ) from e


def _tl_config(path: Path, hf_model, device, dtype):
    """transformer-lens's config for a local checkpoint, read through a neutral name.

    transformer-lens takes the architecture of any path containing "llama" or "gemma" from the
    name instead of config.json (and then fails), so a GPT-2 in /data/llama-study/ckpt would not
    load; a link named `checkpoint` shows it the folder without its path.
    """
    from transformer_lens import loading_from_pretrained as loading  # lazy: transformer-lens takes seconds to import

    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoint"
        link.symlink_to(path, target_is_directory=True)
        cfg = loading.get_pretrained_model_config(
            str(link),
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=True,
            device=str(device),
            dtype=dtype,
            local_files_only=True,
        )
    cfg.model_name, cfg.tokenizer_name = path.name, str(path)
    return cfg


def _convert_local_hf(path: Path, device, dtype):
    from transformer_lens import HookedTransformer  # lazy: transformer-lens takes seconds to import
    from transformer_lens import loading_from_pretrained as loading  # lazy: transformer-lens takes seconds to import
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers takes seconds to import

    # use_safetensors: never fall back to a pickled pytorch_model.bin lying beside the safetensors.
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SaekitError(
            f"checkpoint {path} has no usable tokenizer ({one_line(e, 80)}): save one beside it with tokenizer.save_pretrained"
        ) from e
    cfg = _tl_config(path, hf_model, device, dtype)
    state = loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    model.move_model_modules_to_device()
    return model


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


class HookSpec(NamedTuple):
    name: str
    """Full hook name, e.g. 'blocks.2.hook_resid_pre'."""
    d: int
    """Features per token (trailing dims flattened, e.g. n_heads * d_head for hook_z)."""
    layer: int
    """Block index the hook lives in; -1 before the first block, n_layers after the last."""


def default_hook(model) -> str:
    """The middle layer's residual stream: `blocks.{n_layers // 2}.hook_resid_pre`."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


def _hook_layer(name: str, n_layers: int) -> int:
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    return -1 if name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")) else n_layers


def stop_layer(hooks: list[HookSpec], n_layers: int) -> int | None:
    """`stop_at_layer` for a forward pass that still reaches every hook (None: run it all)."""
    last = max(h.layer for h in hooks)
    return None if last >= n_layers else last + 1


def resolve_hooks(model, names: list[str]) -> list[HookSpec]:
    """Validate hook names against the model and measure each one's width with a 2-token pass.

    Only per-token hooks ([batch, pos, ...]) can be cached; attention patterns ([batch, head,
    q, k]) are refused.
    """
    valid = list(model.hook_dict)
    for n in names:
        if n not in model.hook_dict:
            close = difflib.get_close_matches(n, valid, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {default_hook(model)}"
            raise SaekitError(f"unknown hook '{n}' for model {model.cfg.model_name}; {hint}")
    if len(set(names)) != len(names):
        raise SaekitError(f"--hook lists a hook twice: {names}")
    shapes: dict[str, tuple] = {}

    def grab(act, hook):
        shapes[hook.name] = tuple(act.shape)

    toks = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        model.run_with_hooks(toks, fwd_hooks=[(n, grab) for n in names], return_type=None)
    specs = []
    for n in names:
        s = shapes[n]
        if len(s) < 3 or s[:2] != (1, 2) or n.endswith(("hook_pattern", "hook_attn_scores")):
            raise SaekitError(
                f"hook '{n}' is not a per-token activation (shape {list(s)}): pick a hook_resid_*, hook_mlp_out, hook_z, ..."
            )
        d = 1
        for x in s[2:]:
            d *= x
        specs.append(HookSpec(n, d, _hook_layer(n, model.cfg.n_layers)))
    return specs


# ---------------------------------------------------------------------------------------------
# the model a store was harvested with (eval reruns it; the dashboard decodes tokens with it)

PASS_MODEL = "pass the store's model with --model (a transformer-lens name or a checkpoint folder)"


def check_has_tokens(store: Any, what: str) -> None:
    """One line when `store` holds synthetic activations: no token ids, no language model, so `what`."""
    if isinstance(store.meta.get("synthetic"), dict):
        raise SaekitError(
            f"store {store.path} holds synthetic activations (sae-lens's SyntheticModel): it has no token ids and no "
            f"language model, so {what}; `saekit pursue` measures its ground-truth recovery instead"
        )


def store_model_spec(store: Any, fix: str = PASS_MODEL) -> str:
    """What `load_model` needs to load the model the store records, as harvest loaded it; `fix`
    ends the line when it cannot."""
    model = store.meta.get("model")
    model = model if isinstance(model, dict) else {}
    source, name, path = model.get("source"), model.get("name"), model.get("path")
    if source == "embedded":
        return "embedded"
    if source == "transformer_lens" and isinstance(name, str):
        return name
    if source == "hf_local" and isinstance(path, str):
        if not Path(path).is_dir():
            raise SaekitError(
                f"store {store.path} was harvested from the checkpoint folder {path}, which is not there: {fix}"
            )
        return path
    raise SaekitError(
        f"store {store.path} was harvested from a model saekit cannot load from its record ({source or 'unknown'} "
        f"{name or ''}): {fix}"
    )

"""The SAE: `SparseAutoencoder` (an `Encoder` and a `Decoder`), its directory format, `load_sae`
(the one way to load an SAE), and sae-lens in and out.

    model.py          SparseAutoencoder, save / load, load_sae, from_pretrained, export_sae_lens
    parts.py          SAEConfig, activations, normalization, Encoder, Decoder
    architectures.py  the one table of SAE architectures (TopK, Batch-TopK, ReLU, JumpReLU)
    lens_io.py        conversion to and from sae-lens
    files.py          the file names and helpers model.py and lens_io.py share
"""

from saekit.sae.model import (
    ACTIVATIONS,
    CONFIG_FILE,
    ENCODER_STALE,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Decoder,
    Dictionary,
    Encoder,
    EncoderOutput,
    ForwardOutput,
    Normalization,
    SAEConfig,
    SparseAutoencoder,
    batch_topk_activation,
    check_sae_fits_hook,
    encoder_cost,
    jumprelu_activation,
    load_sae,
    topk_activation,
)

__all__ = [
    "ACTIVATIONS",
    "CONFIG_FILE",
    "ENCODER_STALE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Dictionary",
    "SAEConfig",
    "Normalization",
    "Encoder",
    "Decoder",
    "EncoderOutput",
    "ForwardOutput",
    "SparseAutoencoder",
    "batch_topk_activation",
    "check_sae_fits_hook",
    "encoder_cost",
    "jumprelu_activation",
    "load_sae",
    "topk_activation",
]

"""`sae_kit.sparse_autoencoder`: the original import path of SparseAutoencoder (see saekit.sae)."""

from saekit.sae import Decoder, Encoder, SparseAutoencoder

__all__ = ["Decoder", "Encoder", "SparseAutoencoder"]

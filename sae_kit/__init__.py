"""Compatibility alias for the original sae-kit API, so its README's snippets run unchanged.

    from sae_kit.sparse_autoencoder import SparseAutoencoder
    from sae_kit.gradient_pursuit import gradient_pursuit
    from sae_kit.utils import cached_activation_generator, compute_metrics

Everything here is a re-export from `saekit`; new code should import `saekit` directly.
"""

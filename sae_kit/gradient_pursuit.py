"""`sae_kit.gradient_pursuit`: the original import path of gradient_pursuit (see saekit.pursuit)."""

from saekit.pursuit import gradient_pursuit

__all__ = ["gradient_pursuit"]

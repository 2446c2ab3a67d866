"""`sae_kit.utils`: the original import path of the activation generator and compute_metrics."""

from saekit.harvest.generator import cached_activation_generator
from saekit.metrics import compute_metrics

__all__ = ["cached_activation_generator", "compute_metrics"]

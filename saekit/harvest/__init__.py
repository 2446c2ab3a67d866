"""Stage 1, harvest: a language model over a text dataset, once, into an activation store.

stage.py      HarvestConfig, run: find the store (reuse, extend, resume, new), open it, drive the loop
loop.py       the one forward -> assemble -> write loop, shared with the original API
generator.py  cached_activation_generator (the original sae-kit API) on that loop
"""

from saekit.harvest.generator import cached_activation_generator
from saekit.harvest.stage import (
    HarvestConfig,
    HarvestResult,
    run,
    run_loaded,
)

__all__ = [
    "cached_activation_generator",
    "HarvestConfig",
    "HarvestResult",
    "run",
    "run_loaded",
]

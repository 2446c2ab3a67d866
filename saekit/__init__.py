"""saekit: sparse autoencoders over a shared on-disk activation cache.

The library never imports the CLI (`saekit.cli`, installed from the top-level `cli/` folder).
Submodules are imported lazily by users: `saekit.store`, `saekit.harvest`, `saekit.sae`,
`saekit.pursuit`, `saekit.train`, `saekit.pursue`.
"""

from saekit.errors import SaekitError

__version__ = "0.1.0"
__all__ = ["SaekitError", "__version__"]

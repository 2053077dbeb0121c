"""alignscope: residual-Jacobian probes of transformer blocks (coupling, alignment, trajectories).

``from alignscope import probe`` is the library entry point. Importing the package loads torch only;
transformers, Lightning, Hydra and W&B are imported where they are used.

Layers, each importing only those before it: ``core`` (matrices) < ``autodiff`` (one block's Jacobian) <
``models`` (Hugging Face access) < ``probing`` (``probe()``, ``ProbeResult``) < ``apps`` (Lightning, Hydra,
W&B, figures).
"""

from alignscope.core.randomized import RandomizedSVD
from alignscope.models import BlockAdapter, random_init_twin, register_adapter
from alignscope.probing.degenerate import DegenerateResultWarning
from alignscope.probing.probe import probe, token_jacobians
from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings

__version__ = "0.1.0"
__all__ = [
    "BlockAdapter",
    "DegenerateResultWarning",
    "ProbeResult",
    "ProbeSettings",
    "RandomizedSVD",
    "__version__",
    "probe",
    "random_init_twin",
    "register_adapter",
    "token_jacobians",
]

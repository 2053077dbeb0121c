"""alignscope: residual-Jacobian probes of transformer blocks (coupling, alignment, trajectories).

``from alignscope import probe`` is the library entry point. Importing the package loads torch only;
transformers, Lightning, Hydra and W&B are imported where they are used.
"""

from alignscope.degenerate import DegenerateResultWarning
from alignscope.models import BlockAdapter, random_init_twin, register_adapter
from alignscope.probe import probe
from alignscope.randomized import RandomizedSVD
from alignscope.result import ProbeResult

__version__ = "0.1.0"
__all__ = [
    "BlockAdapter",
    "DegenerateResultWarning",
    "ProbeResult",
    "RandomizedSVD",
    "__version__",
    "probe",
    "random_init_twin",
    "register_adapter",
]

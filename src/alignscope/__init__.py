"""alignscope: residual-Jacobian probes of transformer blocks (coupling, alignment, trajectories).

``from alignscope import probe`` is the library entry point; ``model, tokenizer = alignscope.load_model(name)``
loads a ``conf/model`` entry (e.g. the offline ``smollm2_135m``), a local folder or a hub id
(:func:`alignscope.apps.named_models.load_model`; Hydra reads the entry when it is called). Importing the
package loads torch only; transformers, Lightning, Hydra and W&B are imported where they are used.

Layers, each importing only those before it: ``core`` (matrices) < ``autodiff`` (one block's Jacobian) <
``models`` (Hugging Face access) < ``probing`` (``probe()``, ``ProbeResult``) < ``apps`` (Lightning, Hydra,
W&B, figures).
"""

from typing import TYPE_CHECKING, Any

from alignscope.core.randomized import RandomizedSVD
from alignscope.models import BlockAdapter, random_init_twin, register_adapter
from alignscope.probing.context import ContextCoupling, context_coupling
from alignscope.probing.degenerate import DegenerateResultWarning
from alignscope.probing.probe import probe, token_jacobians
from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings

if TYPE_CHECKING:
    from alignscope.apps.named_models import load_model

__version__ = "0.2.0"
__all__ = [
    "BlockAdapter",
    "ContextCoupling",
    "DegenerateResultWarning",
    "ProbeResult",
    "ProbeSettings",
    "RandomizedSVD",
    "__version__",
    "context_coupling",
    "load_model",
    "probe",
    "random_init_twin",
    "register_adapter",
    "token_jacobians",
]


def __getattr__(name: str) -> Any:
    """``load_model`` is imported on first use (it needs Hydra, which ``import alignscope`` does not load)."""
    if name == "load_model":
        from alignscope.apps.named_models import load_model

        return load_model
    raise AttributeError(f"module 'alignscope' has no attribute {name!r}")

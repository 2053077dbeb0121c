"""The memory check before a load: a model whose weights would not fit in available memory is refused before
any weight is read (CPU loads; ``device_map`` loads are left to accelerate)."""

from __future__ import annotations

from typing import Any

import torch

from alignscope.models.errors import ModelLoadError


def _available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(config: Any, model_class: Any) -> int:
    """Parameters of ``model_class`` built from ``config`` on the meta device (no memory used)."""
    with torch.device("meta"):
        model = model_class.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_memory(config: Any, model_class: Any, dtype: torch.dtype, device_map: Any, label: str) -> int:
    """Refuse, before loading, a model whose weights would not fit in available memory (CPU loads).

    Returns the parameter count; the limit is 80% of available memory."""
    n = parameter_count(config, model_class)
    need = n * torch.tensor([], dtype=dtype).element_size()
    have = _available_bytes()
    if device_map is None and have is not None and need > 0.8 * have:
        raise ModelLoadError(
            f"{label} has {n / 1e9:.2f}B parameters: {need / 2**30:.1f} GiB of weights in {str(dtype)[6:]}, but only "
            f"{have / 2**30:.1f} GiB of memory is available (the limit is 80%). Options: model.dtype=bfloat16 "
            "(half the memory; Jacobians are still computed in float32 block by block), model.device_map=auto "
            "(shard over GPUs and CPU with accelerate), or a smaller model."
        )
    return n

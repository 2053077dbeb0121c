"""Quantized weights: which schemes a probe can differentiate through, and a clear error for the others.

bitsandbytes 8-bit layers (``Linear8bitLt``) dequantize in their forward, and autograd differentiates
that computation, on the CPU and on CUDA. bitsandbytes 4-bit layers (``Linear4bit``) do so on CUDA; on the
CPU, bitsandbytes repacks the weights for its inference kernel on the first no-grad forward, and that
kernel has no autograd formula, so every Jacobian would silently be zero: refused here.
"""

from __future__ import annotations

import torch
from torch import nn


def quantization(model: nn.Module) -> str | None:
    """The model's weight quantization, e.g. ``"bitsandbytes 8-bit"``, ``"bitsandbytes 4-bit (nf4)"``, or
    None for float weights (``meta["quantization"]``)."""
    kinds = set()
    for module in model.modules():
        cls = type(module)
        if not cls.__module__.startswith("bitsandbytes"):
            continue
        if cls.__name__ in ("Linear8bitLt",):
            kinds.add("bitsandbytes 8-bit")
        elif "4bit" in cls.__name__ or cls.__name__ in ("LinearNF4", "LinearFP4"):
            quant_type = getattr(getattr(module.weight, "quant_state", None), "quant_type", None)
            quant_type = quant_type or getattr(module.weight, "quant_type", None)
            kinds.add(f"bitsandbytes 4-bit ({quant_type})" if quant_type else "bitsandbytes 4-bit")
    return ", ".join(sorted(kinds)) or None


def check_differentiable(model: nn.Module, device: torch.device) -> None:
    """Raise a ``ValueError`` saying what to do when the model's quantized layers give no input gradient
    on ``device`` (bitsandbytes 4-bit on the CPU)."""
    kind = quantization(model) or ""
    if "4-bit" in kind and device.type == "cpu":
        raise ValueError(
            "this model has bitsandbytes 4-bit layers on the CPU, where bitsandbytes runs them through an "
            "inference kernel with no gradient, so every Jacobian would be zero. Probe it on a CUDA GPU "
            "(device_map='cuda'), load it in 8-bit (BitsAndBytesConfig(load_in_8bit=True), which probes on "
            "the CPU), or load it in a float dtype without quantization_config "
            "(from_pretrained(..., torch_dtype=torch.bfloat16))"
        )

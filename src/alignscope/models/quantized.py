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


DEQUANTIZED_AT_LOAD = ("gguf",)
"""``quantization_config`` methods whose weights are float once loaded."""


def _config_method(model: nn.Module) -> str | None:
    """The ``quant_method`` of the model's ``quantization_config`` (transformers' quantizers), or None."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def check_differentiable(model: nn.Module, device: torch.device) -> None:
    """Raise a ``ValueError`` saying what to do when the model's quantized layers give no input gradient
    on ``device`` (bitsandbytes 4-bit on the CPU), or are of a scheme not tested here (GPTQ, AWQ, HQQ,
    torchao, ...: their packed weights may sit in buffers that a cast copy of a block would corrupt)."""
    method = _config_method(model)
    if method is not None and method != "bitsandbytes" and method not in DEQUANTIZED_AT_LOAD:
        raise ValueError(
            f"this model is quantized with {method!r}, which alignscope has not been checked against (only "
            "bitsandbytes is); load it in a float dtype to probe it: from_pretrained(..., "
            "torch_dtype=torch.bfloat16) without quantization_config, e.g. the unquantized checkpoint"
        )
    kind = quantization(model) or ""
    if "4-bit" in kind and device.type == "cpu":
        raise ValueError(
            "this model has bitsandbytes 4-bit layers on the CPU, where bitsandbytes runs them through an "
            "inference kernel with no gradient, so every Jacobian would be zero. Probe it on a CUDA GPU "
            "(device_map='cuda'), load it in 8-bit (BitsAndBytesConfig(load_in_8bit=True), which probes on "
            "the CPU), or load it in a float dtype without quantization_config "
            "(from_pretrained(..., torch_dtype=torch.bfloat16))"
        )

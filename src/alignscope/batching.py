"""Batched vector-Jacobian products without per-row loops.

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward pass under ``vmap``. The backward
kernels of SiLU, GELU and softmax (``silu_backward``, ``gelu_backward``, ``_softmax_backward_data``) have no
batching rule in torch (2.13), so vmap runs them once per row: for a 576-row Jacobian of a SmolLM2 block
that is 576 calls of each, about 40% of the product's time on 2 CPU cores (docs/benchmarks.md).

:func:`batchable_backward` is a context manager for the *forward* pass of a function that will be
differentiated with batched cotangents: while it is active, those three functions compute their forward
values with the very same kernels (bit-identical outputs) but record a backward written in elementwise
operations that vmap batches:

- ``silu(x) = x s``, ``s = sigmoid(x)``: ``d/dx = s (1 + x (1 - s))``;
- ``gelu(x) = x Phi(x)``: ``d/dx = Phi(x) + x phi(x)``; tanh form ``0.5 x (1 + tanh(u))``,
  ``u = sqrt(2/pi) (x + 0.044715 x^3)``: ``d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2)``;
- ``y = softmax(x)`` along ``dim``: ``grad_x = y (g - sum(g y, dim))``.

The backward formulas are themselves differentiable, so double backward (the randomized engine's JVPs)
works through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class _SiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s)))


class _GELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, approximate: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        if ctx.approximate == "tanh":
            t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
            slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        else:
            cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2.0))))
            pdf = torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
            slope = cdf + x * pdf
        return grad * slope, None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(ctx.dim, keepdim=True)), None


def _softmax_args(func, args: tuple, kwargs: dict) -> tuple[Tensor, int, torch.dtype | None] | None:
    """``(input, dim, dtype)`` of a softmax call, or None when it is not one we can route (no int dim).
    ``F.softmax(input, dim, _stacklevel, dtype)``; ``torch.softmax`` and ``Tensor.softmax``: ``(input, dim,
    dtype)``."""
    names = ("input", "dim", "_stacklevel", "dtype") if func is F.softmax else ("input", "dim", "dtype")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    x, dim = bound.get("input", bound.get("self")), bound.get("dim")
    if not isinstance(x, Tensor) or not isinstance(dim, int):
        return None
    return x, dim, bound.get("dtype")


class _BatchableBackward(TorchFunctionMode):
    """Routes SiLU, GELU and softmax to functions whose backward vmap batches (see module docstring)."""

    _softmax = (F.softmax, torch.softmax, Tensor.softmax, torch.Tensor.softmax)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.silu and args and not kwargs.get("inplace", False) and not (len(args) > 1 and args[1]):
            x = args[0]
            if x.requires_grad and x.is_floating_point():
                return _SiLU.apply(x)
        elif func is F.gelu and args:
            x = args[0]
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            if x.requires_grad and x.is_floating_point():
                return _GELU.apply(x, approximate)
        elif func in self._softmax:
            parsed = _softmax_args(func, args, kwargs)
            if parsed is not None and parsed[0].requires_grad:
                x, dim, dtype = parsed
                return _Softmax.apply(x if dtype is None else x.to(dtype), dim)
        return func(*args, **kwargs)


@contextmanager
def batchable_backward() -> Iterator[None]:
    """Record SiLU, GELU and softmax with backward formulas that ``vmap`` batches (forward values unchanged)."""
    with _BatchableBackward():
        yield

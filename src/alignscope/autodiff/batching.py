"""Batched vector-Jacobian products without per-row loops.

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward pass under ``vmap``. The backward
kernels of SiLU, GELU, tanh, layer norm and softmax (``silu_backward``, ``gelu_backward``,
``tanh_backward``, ``native_layer_norm_backward``, ``_softmax_backward_data``, the last also inside the math
kernel of ``scaled_dot_product_attention``) have no batching rule in torch (2.13), so vmap runs them once
per row: a ``d``-row Jacobian makes ``d`` calls of each, a large share of the product's time on CPUs and
a multiple of it on GPUs (measured in docs/benchmarks.md).

:func:`batchable_backward` is a context manager for the *forward* pass of a function that will be
differentiated with batched cotangents: while it is active, these functions compute their forward values
with the very same kernels but record a backward written in elementwise operations and reductions that
vmap batches:

- ``silu(x) = x s``, ``s = sigmoid(x)``: ``d/dx = s (1 + x (1 - s))``;
- ``gelu(x) = x Phi(x)``: ``d/dx = Phi(x) + x phi(x)``; tanh form ``0.5 x (1 + tanh(u))``,
  ``u = sqrt(2/pi) (x + 0.044715 x^3)``: ``d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2)``;
- ``y = tanh(x)``: ``d/dx = 1 - y^2``;
- ``layer_norm``: ``xhat = (x - mean) rstd``, ``g' = g w``: ``grad_x = rstd (g' - mean(g') - xhat mean(g' xhat))``
  (and ``sum(g xhat)``, ``sum(g)`` for a weight and bias that require grad);
- ``y = softmax(x)`` along ``dim``: ``grad_x = y (g - sum(g y, dim))``;
- ``x[..., [i, i + 1], :]`` (one list of consecutive integers, e.g. Falcon's fused query-key-value split) is
  taken as the slice ``x[..., i:i + 2, :]``: the same values, a backward without ``index_put``;
- ``scaled_dot_product_attention`` (without dropout) is written out as its math kernel computes it, with
  that softmax: equal to the kernel to float rounding, not bit for bit (models such as Falcon keep sdpa
  even when eager attention is asked for).

The forward values are bit-identical except for the attention written out. The backward formulas are
themselves differentiable, so double backward (the randomized engine's JVPs) works through them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from alignscope.autodiff import constant_cache

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


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, shape: tuple, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dims, ctx.eps = tuple(range(-len(shape), 0)), eps
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dims = ctx.dims
        mean = x.mean(dims, keepdim=True)  # recomputed from x, so that double backward sees them
        rstd = (x.var(dims, unbiased=False, keepdim=True) + ctx.eps).rsqrt()
        xhat = (x - mean) * rstd
        g = grad if weight is None else grad * weight
        n = math.prod(x.shape[d] for d in dims)  # sums over n, not means: vmap runs mean once per row
        grad_x = rstd * (g - g.sum(dims, keepdim=True) / n - xhat * (g * xhat).sum(dims, keepdim=True) / n)
        leading = tuple(range(grad.dim() - len(dims)))
        grad_w = (grad * xhat).sum(leading) if ctx.needs_input_grad[2] else None
        grad_b = grad.sum(leading) if ctx.needs_input_grad[3] else None
        return grad_x, None, grad_w, grad_b, None


def _attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """``F.scaled_dot_product_attention`` as torch's math kernel computes it (scaled query and key, masks,
    softmax, values), with the softmax from :class:`_Softmax`; equal to the kernel to rounding."""
    root = math.sqrt(scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = (
            constant_cache.on_parts(lambda t: t.repeat_interleave(groups, -3), v) for v in (key, value)
        )
    key_t = constant_cache.on_parts(lambda t: (t * root).transpose(-2, -1), key)  # [..., E, S]
    scores = constant_cache.matmul(query * root, key_t)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return constant_cache.matmul(_Softmax.apply(scores, -1), value)


def _as_basic_index(index) -> tuple[tuple, int] | None:
    """``(the same index with its one list of consecutive integers as a slice, that entry's position)``,
    e.g. ``x[..., [-2], :]`` as ``x[..., -2:-1, :]``: the same values in the same layout, and a backward
    that vmap batches (advanced indexing's, ``index_put``, runs once per row). None for any other index."""
    items = index if isinstance(index, tuple) else (index,)
    lists = [i for i, item in enumerate(items) if isinstance(item, list)]
    basic = all(item is Ellipsis or item is None or isinstance(item, (slice, list)) for item in items)
    if len(lists) != 1 or not basic:  # an int beside a list changes where dimensions go: leave it
        return None
    position, run = lists[0], items[lists[0]]
    if not run or not all(type(v) is int for v in run) or any(b != a + 1 for a, b in itertools.pairwise(run)):
        return None
    if run[0] < 0 <= run[-1]:
        return None
    end = run[-1] + 1
    return (*items[:position], slice(run[0], None if end == 0 else end), *items[position + 1 :]), position


def _sliced(x: Tensor, index) -> Tensor | None:
    """``x[index]`` through :func:`_as_basic_index`, or None: then torch indexes (and raises where a list
    entry is out of range, where the slice would silently come out shorter)."""
    converted = _as_basic_index(index)
    if converted is None:
        return None
    basic, position = converted
    consumed = sum(isinstance(item, slice) for item in basic)  # input dimensions the index names
    out_dim = sum(x.dim() - consumed if item is Ellipsis else 1 for item in basic[:position])
    out = x[basic]
    length = len((index if isinstance(index, tuple) else (index,))[position])
    return out if out.shape[out_dim] == length else None


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
    """Routes SiLU, GELU, tanh, layer norm, softmax, sdpa and list indexing to functions whose backward
    vmap batches."""

    _softmax = (F.softmax, torch.softmax, Tensor.softmax)
    _tanh = (torch.tanh, Tensor.tanh, F.tanh)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        routed = self._constant_cache(func, args, kwargs)
        if routed is not None:
            return routed
        if func is F.silu and args and not kwargs.get("inplace", False) and not (len(args) > 1 and args[1]):
            x = args[0]
            if x.requires_grad and x.is_floating_point():
                return _SiLU.apply(x)
        elif func is F.gelu and args:
            x = args[0]
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            if x.requires_grad and x.is_floating_point():
                return _GELU.apply(x, approximate)
        elif func in self._tanh and args:
            x = args[0]
            if isinstance(x, Tensor) and x.requires_grad and x.is_floating_point() and not kwargs:
                return _Tanh.apply(x)
        elif func is F.layer_norm and args:
            bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args, strict=False))
            bound.update(kwargs)
            x = bound["input"]
            if x.requires_grad and x.is_floating_point():
                shape = tuple(bound["normalized_shape"])
                return _LayerNorm.apply(
                    x, shape, bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
                )
        elif func is F.scaled_dot_product_attention and len(args) >= 3:
            bound = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:], strict=False))
            bound.update(kwargs)
            if not bound.get("dropout_p") and any(
                isinstance(t, Tensor) and t.requires_grad for t in args[:3]
            ):
                return _attention(*args[:3], **bound)
        elif func is Tensor.__getitem__ and len(args) == 2 and args[0].requires_grad:
            routed = _sliced(args[0], args[1])
            if routed is not None:
                return routed
        elif func in self._softmax:
            parsed = _softmax_args(func, args, kwargs)
            if parsed is not None and parsed[0].requires_grad:
                x, dim, dtype = parsed
                return _Softmax.apply(x if dtype is None else x.to(dtype), dim)
        return func(*args, **kwargs)

    @staticmethod
    def _constant_cache(func, args: tuple, kwargs: dict) -> Tensor | None:
        """A KV cache's join of constant and new keys, a shape operation on it, or a product with it
        (:mod:`alignscope.autodiff.constant_cache`); None for anything else."""
        if func in constant_cache.CATS:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            extra = set(kwargs) - {"tensors", "dim"}
            return None if extra or len(args) > 2 else constant_cache.joined(tensors, dim)
        if func in constant_cache.MATMULS:
            return constant_cache.split_matmul(*args) if len(args) == 2 and not kwargs else None
        if func in constant_cache.SHAPE_OPS and args:
            return constant_cache.shape_op(func, args, kwargs)
        return None


@contextmanager
def batchable_backward() -> Iterator[None]:
    """Record SiLU, GELU, tanh, layer norm, softmax, sdpa and list indexing with backward formulas that
    ``vmap`` batches (see the module docstring)."""
    with _BatchableBackward():
        yield

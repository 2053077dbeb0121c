"""Jacobian engines: the derivative of one block's output at a token w.r.t. its input at a token.

An engine sees a block only as a function ``block_fn: [n, T, d] -> [n, T, d]`` (a batch of ``n`` copies of
one sequence) and the block input ``x: [T, d]`` of that sequence. For each requested pair ``k`` it returns
``d y[t_out_k] / d x[t_in_k]`` (``d x d``, rows index output coordinates), every other token's input held fixed
at its value in ``x``. The identity is *not* subtracted here (see :func:`residual_jacobian`).

Engines are interchangeable behind :class:`JacobianEngine`; the metrics never see how a Jacobian was made.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from alignscope.autodiff.batching import batchable_backward

BlockFn = Callable[[Tensor], Tensor]
"""A block as a function of its hidden-state input: ``[n, T, d] -> [n, T, d]``."""


@runtime_checkable
class JacobianEngine(Protocol):
    """Computes token-to-token Jacobians of one block for one sequence."""

    name: str

    def __call__(self, block_fn: BlockFn, x: Tensor, t_in: Tensor, t_out: Tensor) -> Tensor:
        """Return ``[n, d, d]`` with ``out[k, a, b] = d block_fn(x)[t_out[k], a] / d x[t_in[k], b]``.

        ``x``: ``[T, d]``; ``t_in``, ``t_out``: ``[n]`` integer positions.
        """
        ...


@dataclass
class ReverseModeEngine:
    """Exact Jacobians by reverse mode over the rows of the identity, through the full-sequence block call.

    One forward pass per group of token pairs (each pair is one copy of the sequence in the batch, with its
    own input row as the variable), then ``d / chunk_size`` vector-Jacobian products, each batched over
    ``chunk_size`` identity rows (``is_grads_batched``; ``vectorize=False`` uses a plain loop of
    ``torch.autograd.grad``, one row at a time). The graph is retained across the products and freed after
    each group, so memory is bounded by about ``chunk_size * copies * T`` activation rows. The forward is
    recorded under :func:`~alignscope.autodiff.batching.batchable_backward`, so no backward op runs row by row.

    Args:
        chunk_size: identity rows per vector-Jacobian product.
        vectorize: batch the rows with ``is_grads_batched`` (falls back to the loop if vmap fails).
        max_rows: upper bound on ``chunk_size * copies * T``, which sets how many token pairs share one
            forward pass.
    """

    chunk_size: int = 32
    vectorize: bool = True
    max_rows: int = 16384
    name: str = "reverse"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {self.max_rows!r}")

    def __call__(self, block_fn: BlockFn, x: Tensor, t_in: Tensor, t_out: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"x must be [T, d], got shape {tuple(x.shape)}")
        t_in = torch.as_tensor(t_in, dtype=torch.long, device=x.device).reshape(-1)
        t_out = torch.as_tensor(t_out, dtype=torch.long, device=x.device).reshape(-1)
        if t_in.shape != t_out.shape:
            raise ValueError("t_in and t_out must have the same length")
        seq_len, d = x.shape
        chunk = min(self.chunk_size, d)
        group = max(1, self.max_rows // (seq_len * (chunk if self.vectorize else 1)))
        out = x.new_empty(len(t_in), d, d)
        for start in range(0, len(t_in), group):
            sl = slice(start, start + group)
            out[sl] = self._group(block_fn, x, t_in[sl], t_out[sl], chunk)
        return out

    def _group(self, block_fn: BlockFn, x: Tensor, t_in: Tensor, t_out: Tensor, chunk: int) -> Tensor:
        n, (_seq_len, d) = len(t_in), x.shape
        rows = torch.arange(n, device=x.device)
        with torch.enable_grad(), batchable_backward():
            variable = x.detach()[t_in].clone().requires_grad_(True)  # [n, d]
            if n == 1 and _seq_len == 1:  # one token (single-token calls): no scatter in the graph
                hidden = variable.view(1, 1, d)
                y = block_fn(hidden)[:, 0]  # [1, d]
            else:
                hidden = x.detach().unsqueeze(0).repeat(n, 1, 1).index_put((rows, t_in), variable)
                out = block_fn(hidden)
                # one select per pair: vmap batches select's backward, not advanced indexing's
                y = torch.stack([out[i, t] for i, t in enumerate(t_out.tolist())])  # [n, d]
        jac = x.new_zeros(n, d, d)
        if not y.requires_grad:  # output does not depend on the variable (e.g. a token that cannot see t_in)
            return jac
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        vectorize = self.vectorize
        r0 = 0
        while r0 < d:
            r1 = min(d, r0 + (chunk if vectorize else 1))
            if vectorize:
                try:
                    g = eye[r0:r1, None, :].expand(r1 - r0, n, d)
                    (grad,) = torch.autograd.grad(
                        y, variable, g, retain_graph=True, is_grads_batched=True, allow_unused=True
                    )
                    if grad is not None:
                        jac[:, r0:r1] = grad.transpose(0, 1)
                    r0 = r1
                    continue
                except torch.OutOfMemoryError as err:  # fewer rows per product, not a row loop
                    chunk = _halved_after_oom(err, chunk, "rows per batched VJP", x.device)
                    continue
                except RuntimeError as err:  # an op without a batching rule: fall back to the plain loop
                    warnings.warn(f"vectorized VJP failed ({err}); falling back to a row loop", stacklevel=2)
                    vectorize = False
            for r in range(r0, r1):
                (grad,) = torch.autograd.grad(
                    y, variable, eye[r].expand(n, d), retain_graph=True, allow_unused=True
                )
                if grad is not None:
                    jac[:, r] = grad
            r0 = r1
        return jac


def jacobian_by_copies(copies_fn: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int = 256) -> Tensor:
    """``d x d`` Jacobian ``d f(x) / d x`` of a row function evaluated on independent copies (``copies_fn:
    [n, d] -> [n, d]``, row ``i`` of the output a function of input row ``i`` alone, e.g.
    :func:`alignscope.models.capture.token_copies_function`): for each chunk of ``n`` identity rows, ``n`` copies of
    ``x`` go through one forward pass and one plain backward pass with cotangent ``e_r`` on copy ``r``.
    Twice the arithmetic of a batched VJP (the forward runs per row), but dense matrix products only.
    """
    d = x.shape[-1]
    jac = x.new_empty(d, d)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    r0 = 0
    while r0 < d:
        r1 = min(d, r0 + chunk_size)
        try:
            with torch.enable_grad():
                rows = x.detach().expand(r1 - r0, d).clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(copies_fn(rows), rows, eye[r0:r1], allow_unused=True)
        except torch.OutOfMemoryError as err:
            chunk_size = _halved_after_oom(err, chunk_size, "copies per pass", x.device)
            continue
        jac[r0:r1] = 0 if grad is None else grad
        r0 = r1
    return jac


def _halved_after_oom(err: torch.OutOfMemoryError, size: int, what: str, device: torch.device) -> int:
    """Half of ``size`` after the out-of-memory error ``err``, with a warning and the CUDA allocator's free
    blocks given back; raises ``err`` when ``size`` is already 1."""
    if size == 1:
        raise err
    size //= 2
    warnings.warn(f"out of memory; retrying with {size} {what}", stacklevel=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return size


def residual_jacobian(jacobian: Tensor) -> Tensor:
    """``J - I`` for ``[..., d, d]`` Jacobians of a block's output w.r.t. the same token's input."""
    d = jacobian.shape[-1]
    return jacobian - torch.eye(d, dtype=jacobian.dtype, device=jacobian.device)


ENGINES: dict[str, Callable[..., JacobianEngine]] = {"reverse": ReverseModeEngine}


def make_engine(engine: str | JacobianEngine | None = None, **options) -> JacobianEngine:
    """An engine by name (``"reverse"``) or pass-through of an engine instance; ``None`` gives the default."""
    if engine is None:
        engine = "reverse"
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ValueError(f"unknown Jacobian engine {engine!r}; choose one of {sorted(ENGINES)}")
        return ENGINES[engine](**options)
    if options:
        raise ValueError("engine options can only be given with an engine name, not an engine instance")
    if not isinstance(engine, JacobianEngine):
        raise TypeError(f"engine must be a name or a JacobianEngine, got {type(engine).__name__}")
    return engine

"""One block at one token as a linear operator ``J = d y_t / d x_t - I`` (``d x d``), reached only through
Jacobian-vector and vector-Jacobian products (what :class:`alignscope.core.randomized.RandomizedSVD` needs)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from alignscope.autodiff.batching import batchable_backward

RowFn = Callable[[Tensor], Tensor]
"""A block at one token as a function of that token's input row: ``[d] -> [d]`` (output row, no identity
subtracted)."""


class LinearizedBlock:
    """The residual Jacobian ``J = d f(x) / d x - I`` of ``row_fn`` at ``x`` (``[d]``), as products.

    ``vjp(U)`` (``[r, d] -> [r, d]``, rows ``u^T J``) runs batched reverse-mode products over one retained
    forward graph. ``jvp(V)`` (``[r, d] -> [r, d]``, rows ``J v``) differentiates that VJP once more:
    ``g(u) = J_f^T u`` is built once with ``create_graph`` and ``J_f v = d <g(u), v> / du``, batched over
    the rows (measured 3x faster here than ``torch.func.jvp`` under ``vmap``, which re-runs the forward and
    copies the weights on every call; it remains the fallback). Both work in chunks of ``chunk_size`` rows.
    With ``copies_fn`` (the block on independent copies of the token, for long contexts, see
    :func:`alignscope.models.capture.token_copies_function`) both run on copies instead: a forward and a plain
    backward pass per chunk (VJP), forward mode through the copies (JVP); no vmap, no per-row gradients of
    the cached keys and values.
    """

    def __init__(
        self,
        row_fn: RowFn,
        x: Tensor,
        chunk_size: int = 64,
        copies_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if x.ndim != 1:
            raise ValueError(f"x must be one input row [d], got shape {tuple(x.shape)}")
        self.row_fn, self.x, self.d, self.chunk_size = row_fn, x.detach(), x.shape[0], chunk_size
        self.copies_fn = copies_fn  # [n, d] -> [n, d] on independent copies: products without vmap
        self._output: Tensor | None = None  # the forward graph, built on the first product and kept
        self._transpose: Tensor | None = None  # g(u) = J_f^T u with its graph
        self._vectorize = True
        self._forward_mode = False

    def vjp(self, rows: Tensor) -> Tensor:
        """``rows @ J`` for ``rows: [r, d]``."""
        if self.copies_fn is not None:
            return self._chunked(rows, self._copies_vjp)
        output, variable = self._forward()
        if not output.requires_grad:
            return -rows
        return self._chunked(rows, lambda c: self._grad(output, variable, c))

    def jvp(self, rows: Tensor) -> Tensor:
        """``rows @ J^T`` (each row ``v`` mapped to ``J v``) for ``rows: [r, d]``."""
        if self.copies_fn is not None:
            return self._chunked(rows, self._copies_jvp)
        if not self._forward_mode:
            try:
                transpose, u = self._transposed()
                if transpose is None:
                    return -rows
                return self._chunked(rows, lambda c: self._grad(transpose, u, c))
            except RuntimeError as err:  # an op without a double-backward: forward mode from here on
                warnings.warn(f"JVP by double backward failed ({err}); using forward mode", stacklevel=2)
                self._forward_mode = True

        def single(v: Tensor) -> Tensor:
            return torch.func.jvp(self.row_fn, (self.x,), (v,))[1]

        return self._chunked(rows, lambda c: torch.func.vmap(single)(c))

    def _copies_vjp(self, chunk: Tensor) -> Tensor:
        """One forward of ``len(chunk)`` copies and one plain backward, cotangent row ``i`` on copy ``i``."""
        with torch.enable_grad():
            copies = self.x.expand(len(chunk), self.d).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.copies_fn(copies), copies, chunk, allow_unused=True)
        return torch.zeros_like(chunk) if grad is None else grad

    def _copies_jvp(self, chunk: Tensor) -> Tensor:
        """Forward mode through ``len(chunk)`` copies, tangent row ``i`` on copy ``i`` (batched natively)."""
        primal = self.x.expand(len(chunk), self.d).contiguous()
        return torch.func.jvp(self.copies_fn, (primal,), (chunk.contiguous(),))[1]

    def _forward(self) -> tuple[Tensor, Tensor]:
        if self._output is None:
            with torch.enable_grad(), batchable_backward():  # no backward op runs row by row under vmap
                self._variable = self.x.clone().requires_grad_(True)
                self._output = self.row_fn(self._variable)
        return self._output, self._variable

    def _transposed(self) -> tuple[Tensor | None, Tensor]:
        if self._transpose is None:
            output, variable = self._forward()
            with torch.enable_grad():
                self._u = torch.zeros_like(self.x, requires_grad=True)
                if output.requires_grad:
                    (g,) = torch.autograd.grad(output, variable, self._u, create_graph=True)
                    self._transpose = g
        return (
            self._transpose if self._transpose is not None and self._transpose.requires_grad else None
        ), self._u

    def _chunked(self, rows: Tensor, product) -> Tensor:
        """``product(chunk) - chunk`` over chunks of rows (the identity removed: residual Jacobian)."""
        out = torch.empty_like(rows)
        for r0 in range(0, rows.shape[0], self.chunk_size):
            chunk = rows[r0 : r0 + self.chunk_size]
            out[r0 : r0 + len(chunk)] = product(chunk) - chunk
        return out

    def _grad(self, output: Tensor, variable: Tensor, chunk: Tensor) -> Tensor:
        if self._vectorize:
            try:
                (grad,) = torch.autograd.grad(
                    output, variable, chunk, retain_graph=True, is_grads_batched=True
                )
                return grad
            except RuntimeError as err:  # an op without a batching rule: a plain loop from here on
                warnings.warn(f"vectorized product failed ({err}); falling back to a row loop", stacklevel=3)
                self._vectorize = False
        return torch.stack([torch.autograd.grad(output, variable, u, retain_graph=True)[0] for u in chunk])

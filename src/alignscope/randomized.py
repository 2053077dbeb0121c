"""Matrix-free top-K singular triplets of a residual Jacobian: a randomized range finder (Halko, Martinsson
and Tropp 2011, algorithms 4.4 and 5.1) driven by Jacobian-vector and vector-Jacobian products only.

The Jacobian is never formed. :class:`LinearizedBlock` wraps one block at one token as the linear operator
``J = d y_t / d x_t - I`` (``d x d``); :class:`RandomizedSVD` returns ``r = K + oversample`` approximate
triplets ``J ~ U diag(S) V^T`` and an a-posteriori error estimate:

- ``residuals[k] = || J v_k - s_k u_k ||`` for the top ``K`` triplets (``K`` extra JVPs). Since ``u_k`` lies in
  the sketched range, ``J^T u_k = s_k v_k`` holds exactly, so a true singular value lies within
  ``residuals[k]`` of ``s_k`` and, by Wedin's theorem, the angle between ``(u_k, v_k)`` and the true singular
  vectors is at most ``residuals[k] / gap_k`` (``gap_k``: distance of ``s_k`` to the other singular values).
- ``tail_fro``: an unbiased estimate of ``|| (I - Q Q^T) J ||_F`` (the part of ``J`` outside the sketch) from
  ``probes`` Gaussian vectors, and ``fro2 = ||Q^T J||_F^2 + tail_fro^2``, an estimate of ``||J||_F^2``.

A non-finite ``J`` gives all-NaN triplets and estimates, a zero ``J`` zero singular values and NaN vectors
(as :func:`alignscope.metrics.svd`), never an error.

Cost: ``r (2 power_iters + 2) + K + probes`` products, against ``d`` for an exact Jacobian.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from alignscope.batching import batchable_backward
from alignscope.metrics import SVD, finite_part, undefined_as_nan

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
    :func:`alignscope.capture.token_copies_function`) both run on copies instead: a forward and a plain
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


@dataclass
class LowRank:
    """``J ~ U diag(S) V^T`` from a sketch: ``U [d, r]``, ``S [r]`` descending, ``V [d, r]``; ``residuals
    [K]`` (``||J v_k - s_k u_k||``), ``tail_fro`` and ``fro2`` (estimates of ``||(I - QQ^T) J||_F`` and
    ``||J||_F^2``), all scalars as 0-d tensors."""

    U: Tensor
    S: Tensor
    V: Tensor
    residuals: Tensor
    tail_fro: Tensor
    fro2: Tensor


@dataclass
class RandomizedSVD:
    """Top-K singular triplets of a :class:`LinearizedBlock` by a randomized range finder.

    Args:
        oversample: extra sketch columns ``p`` (rank ``r = K + p``, at most ``d``).
        power_iters: power (subspace) iterations ``q``, each ``r`` VJPs and ``r`` JVPs; they sharpen the
            sketch when the spectrum decays slowly.
        probes: Gaussian vectors for the estimate of the Frobenius norm left outside the sketch.
        seed: seed of the sketch's random matrix (results are reproducible for a given seed).
    """

    oversample: int = 10
    power_iters: int = 2
    probes: int = 8
    seed: int = 0
    name: str = "randomized"

    def __post_init__(self) -> None:
        for key in ("oversample", "power_iters", "probes", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RandomizedSVD.{key} must be a non-negative integer, got {value!r}")

    def rank(self, k: int, d: int) -> int:
        """Sketch rank ``r = min(d, k + oversample)``."""
        return min(d, k + self.oversample)

    def products(self, k: int, d: int) -> int:
        """Jacobian-vector products per block-token for top-``k`` triplets of a ``d x d`` Jacobian."""
        r = self.rank(k, d)
        return r * (2 * self.power_iters + 2) + min(k, r) + self.probes

    def __call__(self, op: LinearizedBlock, k: int) -> LowRank:
        d, x = op.d, op.x
        r = self.rank(k, d)
        k = min(k, r)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        omega = torch.randn(r + self.probes, d, generator=generator, dtype=x.dtype).to(x.device)
        applied = op.jvp(omega)  # the sketch and the tail probes in one batch
        q = _orthonormal_rows(applied[:r])  # [r, d]: rows span the range of J Omega
        for _ in range(self.power_iters):
            q = _orthonormal_rows(op.jvp(_orthonormal_rows(op.vjp(q))))
        b = op.vjp(q)  # [r, d] = Q^T J
        safe, finite = finite_part(b)  # a non-finite J (NaN weights, overflow) gives non-finite products
        ub, s, vh = torch.linalg.svd(safe, full_matrices=False)  # b = ub diag(s) vh
        u, s, v = undefined_as_nan(SVD(q.T @ ub, s, vh.T), finite)  # [d, r], [r], [d, r]
        residuals = torch.linalg.vector_norm(op.jvp(v[:, :k].T) - (u[:, :k] * s[:k]).T, dim=-1)
        if self.probes:
            jg = applied[r:]  # [m, d]: J g for Gaussian g
            outside = jg - (jg @ q.T) @ q
            tail_fro = outside.square().sum(-1).mean().sqrt()
        else:
            tail_fro = torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
        return LowRank(u, s, v, residuals, tail_fro, s.square().sum() + tail_fro.square())


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows of ``rows`` (``[r, d]``, ``r <= d``)."""
    q, _ = torch.linalg.qr(rows.T)
    return q.T


def vector_angle_bounds(S: Tensor, residuals: Tensor, tail: Tensor) -> Tensor:
    """Wedin bounds ``min(1, residual_k / gap_k)`` on the sine of the angle between each of the top-K
    approximate singular vector pairs and the true ones: ``S [..., r]``, ``residuals [..., K]``, ``tail [...]``
    ``-> [..., K]``.

    ``gap_k`` is the distance from ``s_k`` to the nearest other approximate singular value, less the
    uncertainty of both (their residuals for the top K, ``tail`` for the rest of the sketch and for the
    values outside it, which are at most ``tail``); a gap that closes gives 1 (no information).
    """
    k, r = residuals.shape[-1], S.shape[-1]
    s = S[..., :k]
    others = torch.cat([S, torch.zeros_like(S[..., :1])], dim=-1)  # the sketch and 0 for what lies outside
    uncertainty = torch.cat([residuals, tail[..., None].expand(*tail.shape, r + 1 - k)], dim=-1)
    diff = (s[..., :, None] - others[..., None, :]).abs()  # [..., K, r + 1]
    gap = diff - residuals[..., :, None] - uncertainty[..., None, :]
    own = torch.zeros(k, r + 1, dtype=torch.bool, device=S.device)
    own[torch.arange(k), torch.arange(k)] = True
    gap = torch.where(own, torch.full_like(gap, float("inf")), gap).amin(-1)
    bound = torch.where(gap > 0, residuals / gap, torch.ones_like(residuals))
    return bound.clamp(max=1.0)

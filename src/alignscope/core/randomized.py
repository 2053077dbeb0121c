"""Matrix-free top-K singular triplets of a residual Jacobian: a randomized range finder (Halko, Martinsson
and Tropp 2011, algorithms 4.4 and 5.1) driven by Jacobian-vector and vector-Jacobian products only.

The Jacobian is never formed: the operator (e.g. :class:`alignscope.autodiff.linearized.LinearizedBlock`,
one block at one token, ``J = d y_t / d x_t - I``, ``d x d``) is reached through products. :class:`RandomizedSVD` returns ``r = K + oversample`` approximate
triplets ``J ~ U diag(S) V^T`` and an a-posteriori error estimate:

- ``residuals[k] = || J v_k - s_k u_k ||`` for the top ``K`` triplets (``K`` extra JVPs). Since ``u_k`` lies in
  the sketched range, ``J^T u_k = s_k v_k`` holds exactly, so a true singular value lies within
  ``residuals[k]`` of ``s_k`` and, by Wedin's theorem, the angle between ``(u_k, v_k)`` and the true singular
  vectors is at most ``residuals[k] / gap_k`` (``gap_k``: distance of ``s_k`` to the other singular values).
- ``tail_fro``: an unbiased estimate of ``|| (I - Q Q^T) J ||_F`` (the part of ``J`` outside the sketch) from
  ``probes`` Gaussian vectors, and ``fro2 = ||Q^T J||_F^2 + tail_fro^2``, an estimate of ``||J||_F^2``.

A non-finite ``J`` gives all-NaN triplets and estimates, a zero ``J`` zero singular values and NaN vectors
(as :func:`alignscope.core.factorization.svd`), never an error.

Cost: ``r (2 power_iters + 2) + K + probes`` products, against ``d`` for an exact Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from alignscope.core.factorization import SVD, finite_part, undefined_as_nan


class LinearOperator(Protocol):
    """A ``d x d`` matrix reached through products: ``jvp(rows [n, d]) = rows J^T`` and ``vjp(rows [n, d]) =
    rows J``; ``x`` is a tensor with the operator's device and dtype; ``d`` its size."""

    d: int
    x: Tensor

    def jvp(self, rows: Tensor) -> Tensor: ...

    def vjp(self, rows: Tensor) -> Tensor: ...


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
    """Top-K singular triplets of a linear operator (:class:`LinearOperator`) by a randomized range finder.

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

    def __call__(self, op: LinearOperator, k: int) -> LowRank:
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

"""Coupling across tokens: ``m_K`` between the Jacobians of one block at different tokens, and between the
cross-token (context) Jacobians of one block.

Both are :func:`~alignscope.core.metrics.coupling_from_projections` over a token axis instead of a block axis:
for matrices ``J_a`` (``a`` over tokens or token pairs) with top-K factors ``U_a, S_a, V_a``,
``m_K[a, b] = || |U_{b,K}^T J_a V_{b,K}| - diag(s_{a,1..K}) ||_F / ||s_{a,1..K}||`` (the same definition, and
the same ``normalization`` and ``p`` options, as the coupling between blocks; docs/metrics.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignscope.core import factorization, metrics


def coupling_across(
    jacobians: Tensor,
    ks: list[int],
    normalization: str = "norm",
    p: float = 2.0,
    method: str = "auto",
    factors: factorization.SVD | None = None,
) -> dict[int, Tensor]:
    """``m_K`` between every ordered pair of matrices along the first axis: ``[n, d, d] -> {K: [n, n]}``.

    ``jacobians[a]`` is one block's Jacobian at token (or token pair) ``a``; ``out[K][a, b] = m_K(J_a, J_b)``.
    K is clipped to ``d``; a non-finite or zero ``J_a`` gives NaN in row and column ``a``. ``factors``: their
    singular values (all, ``[n, >= Kmax]``) and top-Kmax vectors when already computed (else by ``method``).
    """
    if jacobians.ndim != 3 or jacobians.shape[-1] != jacobians.shape[-2]:
        raise ValueError(f"jacobians must be [n, d, d], got shape {tuple(jacobians.shape)}")
    d = jacobians.shape[-1]
    clipped = {k: min(k, d) for k in ks}
    kmax = max(clipped.values())
    factors = factors if factors is not None else factorization.top_svd(jacobians, kmax, method)
    projected = metrics.coupling_projections(jacobians, factors, kmax, "ujv")
    return metrics.coupling_from_projections(projected, factors.S, clipped, normalization, p)


def token_coupling(
    jacobians: Tensor,
    ks: list[int],
    normalization: str = "norm",
    p: float = 2.0,
    method: str = "auto",
    factors: factorization.SVD | None = None,
) -> dict[int, Tensor]:
    """Self-coupling across tokens, per block: residual Jacobians ``[T, L', d, d]`` of one prompt's probed
    tokens -> ``{K: [L', T, T]}`` with ``out[K][l, t, t'] = m_K(J^l_t, J^l_{t'})``. ``factors``: ``U``, ``V``
    ``[T, L', d, >= Kmax]``, ``S`` ``[T, L', >= Kmax]`` when already computed."""
    if jacobians.ndim != 4:
        raise ValueError(f"jacobians must be [T, L', d, d], got shape {tuple(jacobians.shape)}")
    per_block = []
    for i in range(jacobians.shape[1]):
        block = None if factors is None else factorization.SVD(*(f[:, i] for f in factors))
        per_block.append(coupling_across(jacobians[:, i], ks, normalization, p, method, block))
    return {k: torch.stack([m[k] for m in per_block]) for k in ks}


def token_coupling_summary(m: Tensor) -> Tensor:
    """Mean over blocks and ordered token pairs ``t != t'`` of ``1 - m_K^2``, ignoring NaN padding:
    ``[..., L', T, T] -> [...]``."""
    n = m.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=m.device)
    values = (1 - m**2).masked_fill(~off, float("nan"))
    return values.flatten(-3).nanmean(-1)

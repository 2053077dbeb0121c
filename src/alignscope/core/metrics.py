"""Metrics on residual Jacobians and token trajectories (plain torch; definitions as in docs/metrics.md).

Conventions: ``L`` blocks, model width ``d``; Jacobians are residual Jacobians ``J = dx^l/dx^{l-1} - I``.
A value that cannot be computed (non-finite input, a zero Jacobian, a degenerate fit) is NaN, never dropped;
norms are taken in units of the largest entry, so finite inputs far from 1 (float32 squares overflow beyond
1.8e19) give the same ratios as moderate ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from alignscope.core.factorization import SVD, check_k, svd

__all__ = [
    "Expodistance",
    "LinearFit",
    "alignment_matrices",
    "alignment_matrix",
    "chain_cosine",
    "coupling_from_projections",
    "coupling_matrices",
    "coupling_matrix",
    "coupling_norm",
    "coupling_per_block",
    "coupling_projections",
    "coupling_summary",
    "expodistance",
    "inverse_top_singular_fit",
    "line_shape_score",
    "linear_fit",
    "linearization_cosine",
    "linearized_chain",
    "log_norm",
    "off_diagonal_mean",
    "same_side_alignment_matrices",
    "scaled_norm",
    "stable_rank",
    "trajectory_pca",
]


def coupling_matrix(jacobians: Tensor, k: int, form: str = "ujv", factors: SVD | None = None) -> Tensor:
    """Coupling ``m_K`` for every ordered block pair: ``[L, d, d] -> [L, L]``.

    ``out[i, j] = m_K(J_i, J_j) = || |A_{j,K}^T J_i B_{j,K}| - diag(s_{i,1..K}) ||_F / ||s_{i,1..K}||_2``
    with ``(A, B) = (U, V)`` for ``form="ujv"`` (the paper's metric) and ``(V, U)`` for ``form="vju"``;
    ``U_{j,K}, V_{j,K}`` are the top-K singular vectors of ``J_j``, ``s_i`` the singular values of ``J_i``,
    ``|.|`` elementwise. ``K`` is clipped to ``d``. ``m_K(J, J) = 0`` in the ujv form. NaN in row and column
    ``l`` when ``J_l`` is not finite, or zero (row: ``m_K`` is 0/0; column: a zero matrix has no singular
    vectors, :func:`~alignscope.core.factorization.undefined_as_nan`).
    """
    return coupling_matrices(jacobians, [k], form, factors)[k]


def coupling_matrices(
    jacobians: Tensor, ks: list[int], form: str = "ujv", factors: SVD | None = None
) -> dict[int, Tensor]:
    """:func:`coupling_matrix` for several K at once: ``{K: [L, L]}``.

    The projections ``A_{j,K}^T J_i B_{j,K}`` are formed once for the largest K (one ``[L K, d] x [d, L d]``
    matrix product, then one ``[L K, d] x [d, K]`` product per j) and every smaller K reads their top-left
    ``K x K`` block.
    """
    if jacobians.ndim != 3 or jacobians.shape[-1] != jacobians.shape[-2]:
        raise ValueError(f"jacobians must be [L, d, d], got shape {tuple(jacobians.shape)}")
    d = jacobians.shape[-1]
    clipped = {k: check_k(k, d) for k in ks}
    factors = factors if factors is not None else svd(jacobians)
    projected = coupling_projections(jacobians, factors, max(clipped.values()), form)
    return coupling_from_projections(projected, factors.S, clipped)


def coupling_projections(jacobians: Tensor, factors: SVD, k: int, form: str = "ujv") -> Tensor:
    """``out[i, j] = U_{j,K}^T J_i V_{j,K}`` (``form="ujv"``; ``"vju"``: ``V_{j,K}^T J_i U_{j,K}``) for
    ``jacobians`` ``[L, d, d]`` and their ``factors`` (``U``, ``V`` ``[L, d, >= K]``): ``[L, L, K, K]``.

    One ``[L K, d] x [d, L d]`` matrix product, then one ``[L K, d] x [d, K]`` product per j.
    """
    if form not in ("ujv", "vju"):
        raise ValueError(f"form must be 'ujv' or 'vju', got {form!r}")
    n, d = jacobians.shape[0], jacobians.shape[-1]
    U, _, V = factors
    left, right = (U[..., :k], V[..., :k]) if form == "ujv" else (V[..., :k], U[..., :k])
    # applied[j, l, i, :] = (J_i right_j)[:, l]: one GEMM [L K, d] x [d, L d], laid out for the next one
    applied = right.transpose(1, 2).reshape(n * k, d) @ jacobians.reshape(n * d, d).T
    # [j, (l, i), k] = sum_a applied[j, l, i, a] left_j[a, k]: one product per j, rows contiguous
    projected = torch.bmm(applied.view(n, k * n, d), left)
    return projected.view(n, k, n, k).permute(2, 0, 3, 1)  # [L, L, K, K]: left_j^T J_i right_j


def coupling_from_projections(
    projected: Tensor, S: Tensor, clipped: dict[int, int], normalization: str = "norm", p: float = 2.0
) -> dict[int, Tensor]:
    """``{K: m_K [L, L]}`` from ``projected[i, j] = A_{j,Kmax}^T J_i B_{j,Kmax}`` (``[L, L, Kmax, Kmax]``) and the
    singular values ``S`` (``[L, >= Kmax]``); ``clipped`` maps each requested K to its clipped value.
    ``m_K = || |A_{j,K}^T J_i B_{j,K}| - diag(s_{i,1..K}) ||_F / coupling_norm(s_{i,1..K})``
    (:func:`coupling_norm`: the 2-norm by default)."""
    s1 = S[:, :1]  # [L, 1]: both norms in units of s_{i,1} (no overflow of squares, 0/0 for a zero J_i)
    out = {}
    for k, kc in clipped.items():
        s_k = S[:, :kc] / s1  # [L, K]
        diff = projected[..., :kc, :kc].abs() / s1[..., None, None] - torch.diag_embed(s_k)[:, None]
        out[k] = torch.linalg.matrix_norm(diff) / coupling_norm(s_k, normalization, p)[:, None]
    return out


def coupling_norm(s_k: Tensor, normalization: str = "norm", p: float = 2.0) -> Tensor:
    """The denominator of ``m_K`` from the top-K singular values ``s_k`` ``[..., K] -> [...]``:
    ``normalization="norm"``: ``||s_k||_p = (sum_k s_k^p)^(1/p)`` (p = 2: the paper's ``||S_{i,K}||_F``);
    ``"trace"``: ``sum_k s_k`` (the trace of ``S_{i,K}``, equal to the p = 1 norm)."""
    if normalization == "trace":
        return s_k.sum(-1)
    if normalization != "norm":
        raise ValueError(f"normalization must be 'norm' or 'trace', got {normalization!r}")
    return torch.linalg.vector_norm(s_k, ord=p, dim=-1)


def coupling_summary(m: Tensor) -> Tensor:
    """``coupling_K = mean over ordered pairs i != j of (1 - m_K(J_i, J_j)^2)``: ``[..., L, L] -> [...]``.

    Higher means more coupled (1 for identical bases). NaN when there are fewer than two blocks.
    """
    return off_diagonal_mean(1 - m**2)


def coupling_per_block(m: Tensor) -> Tensor:
    """Row means over ``j != i`` of ``1 - m_K(J_i, J_j)^2``: ``[..., L, L] -> [..., L]``."""
    n = m.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=m.device)
    vals = torch.where(off, 1 - m**2, torch.zeros_like(m)).sum(-1)
    return vals / (n - 1) if n > 1 else torch.full_like(vals, float("nan"))


def off_diagonal_mean(a: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of ``[..., n, n]``; NaN for ``n < 2``."""
    n = a.shape[-1]
    if n < 2:
        return torch.full(a.shape[:-2], float("nan"), dtype=a.dtype, device=a.device)
    off = ~torch.eye(n, dtype=torch.bool, device=a.device)
    return torch.where(off, a, torch.zeros_like(a)).sum((-2, -1)) / (n * (n - 1))


def alignment_matrix(U: Tensor, V: Tensor, k: int) -> Tensor:
    """Left/right singular-vector alignment: ``[L, d, d], [L, d, d] -> [L, L]``.

    ``out[i, j] = || |U_{j,K}^T V_{i,K}| - I ||_F / sqrt(K)``. The diagonal is the within-block alignment
    ``a_K(J_i) = || |U_{i,K}^T V_{i,K}| - I ||_F / sqrt(K)`` (0 for a symmetric PSD Jacobian).
    Only the first ``K`` columns of ``U`` and ``V`` are read (``[L, d, >= K]`` is enough). NaN vectors (a
    non-finite or zero Jacobian, :func:`~alignscope.core.factorization.undefined_as_nan`) give NaN in that block's row and column.
    """
    return alignment_matrices(U, V, [k])[k]


def alignment_matrices(U: Tensor, V: Tensor, ks: list[int]) -> dict[int, Tensor]:
    """:func:`alignment_matrix` for several K: ``{K: [L, L]}``, the overlaps formed once at the largest K.

    ``out[i, j] = || |U_{j,K}^T V_{i,K}| - I ||_F / sqrt(K)`` for any two stacks of orthonormal columns:
    ``(U, U)`` gives the left/left alignment ``|| |U_{j,K}^T U_{i,K}| - I ||_F / sqrt(K)`` and ``(V, V)``
    the right/right one (:func:`same_side_alignment_matrices`)."""
    clipped = {k: check_k(k, U.shape[-2]) for k in ks}
    kmax = max(clipped.values())
    overlap = torch.einsum("jak,ial->ijkl", U[..., :kmax], V[..., :kmax]).abs()
    out = {}
    for k, kc in clipped.items():
        eye = torch.eye(kc, dtype=U.dtype, device=U.device)
        out[k] = torch.linalg.matrix_norm(overlap[..., :kc, :kc] - eye) / math.sqrt(kc)
    return out


def same_side_alignment_matrices(
    U: Tensor, V: Tensor, ks: list[int]
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Left/left and right/right singular-vector alignment of every block pair: ``({K: [L, L]}, {K: [L, L]})``,

    ``uu[i, j] = || |U_{j,K}^T U_{i,K}| - I ||_F / sqrt(K)`` and ``vv[i, j] = || |V_{j,K}^T V_{i,K}| - I ||_F /
    sqrt(K)`` (``U``, ``V``: ``[L, d, >= K]``). Both are symmetric with a zero diagonal; 0 where the two
    blocks' top-K vectors agree up to sign, about 1 for unrelated ones when K is a small share of d."""
    return alignment_matrices(U, U, ks), alignment_matrices(V, V, ks)


def line_shape_score(trajectory: Tensor) -> Tensor:
    """Line-shape score of a trajectory ``[L + 1, d] -> []`` (Gai & Zhang 2021).

    Unit-step path ``y^0 = x^0``, ``y^l = y^{l-1} + (x^l - x^{l-1}) / ||x^l - x^{l-1}||``;
    ``LSS = L / ||y^L - y^0||`` (>= 1; 1 for a straight line walked in one direction). A zero step gives NaN.
    """
    steps = trajectory[1:] - trajectory[:-1]
    norms = scaled_norm(steps, keepdim=True)
    unit = torch.where(norms > 0, steps / norms, torch.full_like(steps, float("nan")))
    return steps.shape[0] / torch.linalg.vector_norm(unit.sum(0))


class LinearFit(NamedTuple):
    """Least-squares ``y ~ slope * x + intercept`` and its ``R^2`` (NaN when ``y`` is constant or non-finite)."""

    slope: Tensor
    intercept: Tensor
    r2: Tensor


def linear_fit(x: Tensor, y: Tensor) -> LinearFit:
    """Least-squares line through points ``(x, y)``, both ``[n]``; ``R^2 = 1 - SS_res / SS_tot``."""
    x, y = x.to(y.dtype), y
    if x.numel() < 2:
        nan = torch.tensor(float("nan"), dtype=y.dtype, device=y.device)
        return LinearFit(nan, nan, nan)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = (xc**2).sum()
    slope = (xc * yc).sum() / sxx if sxx > 0 else torch.tensor(float("nan"), dtype=y.dtype, device=y.device)
    intercept = y.mean() - slope * x.mean()
    ss_tot = (yc**2).sum()
    ss_res = ((y - slope * x - intercept) ** 2).sum()
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else torch.tensor(float("nan"), dtype=y.dtype, device=y.device)
    return LinearFit(slope, intercept, r2)


class Expodistance(NamedTuple):
    """Exponential-growth fits of a trajectory: slopes are growth rates of the log per layer."""

    step_slope: Tensor
    step_r2: Tensor
    norm_slope: Tensor
    norm_r2: Tensor


def expodistance(trajectory: Tensor) -> Expodistance:
    """Fit ``log ||x^l - x^{l-1}||`` (``l = 1..L``) and ``log ||x^l||`` (``l = 0..L``) against ``l``.

    ``trajectory``: ``[L + 1, d]``. Zero norms give ``-inf`` logs and hence NaN fits.
    """
    depth = torch.arange(trajectory.shape[0], dtype=trajectory.dtype, device=trajectory.device)
    steps = log_norm(trajectory[1:] - trajectory[:-1])
    norms = log_norm(trajectory)
    step_fit, norm_fit = _finite_fit(depth[1:], steps), _finite_fit(depth, norms)
    return Expodistance(step_fit.slope, step_fit.r2, norm_fit.slope, norm_fit.r2)


def _finite_fit(x: Tensor, y: Tensor) -> LinearFit:
    if not torch.isfinite(y).all():
        nan = torch.tensor(float("nan"), dtype=y.dtype, device=y.device)
        return LinearFit(nan, nan, nan)
    return linear_fit(x, y)


def scaled_norm(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Euclidean norm over ``dim`` computed in units of the largest magnitude, so squares of entries beyond
    ``sqrt`` of the dtype's range (1.8e19 in float32) neither overflow nor underflow."""
    scale = x.abs().amax(dim, keepdim=True)
    norm = scale * torch.linalg.vector_norm(x / torch.where(scale > 0, scale, 1), dim=dim, keepdim=True)
    return norm if keepdim else norm.squeeze(dim)


def log_norm(x: Tensor, dim: int = -1) -> Tensor:
    """``log ||x||`` over ``dim`` as ``log(max |x_i|) + log ||x / max |x_i| ||``: finite for every finite nonzero
    ``x``, even where ``||x||`` itself would overflow; ``-inf`` for a zero vector."""
    scale = x.abs().amax(dim, keepdim=True)
    unit = x / torch.where(scale > 0, scale, 1)
    return scale.squeeze(dim).log() + torch.linalg.vector_norm(unit, dim=dim).log()


def _max_scaled(x: Tensor, dim: int | tuple[int, ...] = -1) -> Tensor:
    """``x`` divided by its largest magnitude over ``dim`` (unchanged where that is 0): for scale-free
    quantities (cosines, ratios) whose squares could overflow."""
    scale = x.abs().amax(dim, keepdim=True)
    return x / torch.where(scale > 0, scale, 1)


def stable_rank(singular_values: Tensor) -> Tensor:
    """``||J||_F^2 / s_1^2 = sum_i (s_i / s_1)^2`` from descending singular values ``[..., d] -> [...]`` (no
    overflow of the squares; NaN for a zero matrix, 0/0)."""
    return (singular_values / singular_values[..., :1]).square().sum(-1)


def inverse_top_singular_fit(top_singular: Tensor, depth: Tensor | None = None) -> LinearFit:
    """Fit of ``1 / s_1`` against block depth (1-based block number unless given): ``[L] -> LinearFit``.
    NaN when any ``s_1`` is zero or not finite."""
    if depth is None:
        depth = torch.arange(1, top_singular.shape[0] + 1)
    inverse = torch.where(torch.isfinite(top_singular), 1 / top_singular, math.nan)  # 1/inf is no 0 here
    return _finite_fit(depth.to(top_singular.dtype).to(top_singular.device), inverse)


def linearization_cosine(jacobians: Tensor, x0: Tensor, xL: Tensor) -> Tensor:
    """Cosine between ``x^L`` and ``(I + J_L) ... (I + J_1) x^0``; ``jacobians``: ``[L, d, d]`` in block order."""
    return chain_cosine(linearized_chain(jacobians, x0), xL)


def linearized_chain(jacobians: Tensor, x0: Tensor) -> Tensor:
    """``(I + J_L) ... (I + J_1) x^0``: ``[L, d, d], [d] -> [d]`` (``jacobians`` in block order)."""
    z = x0
    for J in jacobians:
        z = z + J @ z
    return z


def chain_cosine(chain: Tensor, xL: Tensor) -> Tensor:
    """Cosine between the linearized chain ``(I + J_L) ... (I + J_1) x^0`` and ``x^L`` (both ``[d]``), each
    scaled by its largest entry first so that no square overflows."""
    return torch.nn.functional.cosine_similarity(_max_scaled(chain), _max_scaled(xL), dim=0)


def trajectory_pca(trajectories: Tensor) -> tuple[Tensor, Tensor]:
    """2-D PCA of token trajectories ``[P, L + 1, d]`` (all points pooled, centred).

    Returns coordinates ``[P, L + 1, 2]`` and the explained-variance ratios ``[2]``.
    """
    P, n, d = trajectories.shape
    points = trajectories.reshape(P * n, d)
    centred = points - points.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = min(2, vh.shape[0])
    coords = centred @ vh[:comps].T
    if comps < 2:
        coords = torch.cat([coords, coords.new_zeros(P * n, 2 - comps)], dim=1)
    var = (s / s[0]).square() if s[0] > 0 else s  # in units of the largest: squares cannot overflow
    ratio = var[:2] / var.sum() if var.sum() > 0 else torch.full((2,), float("nan"))
    return coords.reshape(P, n, 2), torch.nn.functional.pad(ratio, (0, 2 - ratio.numel()))

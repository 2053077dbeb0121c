"""The one analysis: every per-token metric from an engine's :class:`TokenFactors`.

Each key of :func:`analyze`'s output is a :class:`~alignscope.probing.result.ProbeResult` field of one token
(the field without its token axis ``P``), and ``extras`` holds the engine's error statement where it has
one. Adding a metric: its function in :mod:`alignscope.core.metrics`, its line here, its field in
``ProbeResult`` (and its scalars in :meth:`ProbeResult.scalars`). The definitions are in docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alignscope.core import metrics
from alignscope.core.randomized import vector_angle_bounds
from alignscope.probing.engines.base import TokenFactors


def analyze(
    f: TokenFactors,
    layers: list[int],
    ks: list[int],
    normalization: str = "norm",
    p: float = 2.0,
    inv_s1_from: int = 1,
) -> dict[str, Any]:
    """The metrics of one token whose probed blocks are ``layers`` (0-based), for each K of ``ks`` (clipped
    to ``d``): ``{field: tensor}`` plus ``extras`` (``{name: tensor}``, empty for exact engines).
    ``normalization`` and ``p``: the denominator of ``m_K`` (:func:`~alignscope.core.metrics.coupling_norm`);
    ``inv_s1_from``: the ``1 / s_1`` fit covers the probed blocks numbered (1-based) from it on."""
    traj, S = f.trajectory, f.S
    clipped = {k: min(k, traj.shape[-1]) for k in ks}
    depth = torch.tensor([layer + 1 for layer in layers])
    expo = metrics.expodistance(traj)
    fitted = depth >= inv_s1_from
    inv_fit = metrics.inverse_top_singular_fit(S[fitted.to(S.device), 0], depth[fitted])
    uu, vv = metrics.same_side_alignment_matrices(f.U, f.V, ks)
    # ||J||_F^2 = sum s_k^2 (+ the part outside a sketch, which counts as one more term of the sum)
    spectrum = S if f.tail_fro is None else torch.cat([S, f.tail_fro[:, None]], -1)
    coupling = metrics.coupling_from_projections(f.ujv, S, clipped, normalization, p)
    out: dict[str, Any] = {
        "hidden_states": traj,
        "singular_values": S,
        "nonfinite": ~torch.isfinite(S).all(-1),  # NaN factors exactly where J was not finite
        "coupling": coupling,
        "coupling_vju": metrics.coupling_from_projections(f.vju, S, clipped, normalization, p),
        "alignment": metrics.alignment_matrices(f.U, f.V, ks),
        "alignment_uu": uu,
        "alignment_vv": vv,
        "lss": metrics.line_shape_score(traj),
        "step_slope": expo.step_slope,
        "step_r2": expo.step_r2,
        "norm_slope": expo.norm_slope,
        "norm_r2": expo.norm_r2,
        "stable_rank": metrics.stable_rank(spectrum),
        "inv_s1_slope": inv_fit.slope,
        "inv_s1_r2": inv_fit.r2,
        "extras": {} if f.residuals is None else error_statement(f, coupling, clipped),
    }
    if f.chain is not None:
        out["linearization_cosine"] = metrics.chain_cosine(f.chain, traj[-1])
    return out


def error_statement(
    f: TokenFactors, coupling: dict[int, Tensor], clipped: dict[int, int]
) -> dict[str, Tensor]:
    """The randomized engine's errors: ``triplet_residuals`` ``[L', Kmax]``, ``tail_fro`` ``[L']`` and
    ``coupling_error_k{K}`` ``[L', L']`` (:func:`coupling_error_bound`)."""
    assert f.residuals is not None and f.tail_fro is not None
    angles = vector_angle_bounds(f.S, f.residuals, f.tail_fro)
    out = {"triplet_residuals": f.residuals, "tail_fro": f.tail_fro}
    for k, kc in clipped.items():
        out[f"coupling_error_k{k}"] = coupling_error_bound(coupling[k], f.S, f.residuals, angles, kc)
    return out


def coupling_error_bound(m: Tensor, S: Tensor, residuals: Tensor, angles: Tensor, k: int) -> Tensor:
    """First-order bound on ``|m_K - m~_K|`` when the projections ``A_j^T J_i B_j`` are exact for the
    approximate vectors: ``[L, L]``. With ``rho_i = ||residuals_i[:K]||`` (bounds the singular-value error)
    and ``D_j = 2 sqrt(2 sum_k angles_{j,k}^2)`` (the sign-aligned left plus right vector errors),
    ``bound[i, j] = ((s_{i,1} + rho_{i,1}) D_j + (1 + m[i, j]) rho_i) / ||s_{i,1..K}||``."""
    rho = torch.linalg.vector_norm(residuals[:, :k], dim=-1)
    vec = 2 * (2 * angles[:, :k].square().sum(-1)).sqrt()
    s1 = S[:, 0] + residuals[:, 0]
    norm = torch.linalg.vector_norm(S[:, :k], dim=-1)
    return (s1[:, None] * vec[None, :] + (1 + m) * rho[:, None]) / norm[:, None]

"""The randomized (matrix-free) path of :func:`alignscope.probe`: per-token metrics without forming any ``J``.

For one token and every probed block ``l`` (same block calls as the exact paths: the single-token call
against the KV cache for causal decoders, the full-sequence call otherwise):

1. top-``Kmax`` singular triplets of ``J_l`` from :class:`~alignscope.core.randomized.RandomizedSVD`;
2. coupling projections computed *exactly* from products: ``J_i V_{j,K}`` for every ``j`` (``L' K`` JVPs of
   block ``i``) gives ``U_{j,K}^T J_i V_{j,K}``, and ``J_i U_{j,K}`` the vju form. Forming them from the
   rank-``r`` sketch instead was measured to bias ``m_K`` by up to 0.1 on SmolLM2's trained blocks, whose
   residual Jacobians keep about 70% of their Frobenius energy outside a rank-20 sketch;
3. the linearization chain ``(I + J_L) ... (I + J_1) x^0`` by one JVP per block.

So the only approximations left are the singular values and vectors (errors stated per triplet by the
residuals ``||J v_k - s_k u_k||``, and propagated to a first-order bound on each ``m_K``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from alignscope.autodiff.linearized import LinearizedBlock
from alignscope.core import metrics
from alignscope.core.randomized import LowRank, RandomizedSVD, vector_angle_bounds
from alignscope.models.capture import BlockCall, block_function, token_block_function, token_copies_function


def row_function(block, call: BlockCall, adapter, dtype: torch.dtype, t: int | None):
    """Block ``l`` at token ``t`` as ``[d] -> [d]`` and its input row: ``t=None`` for a single-token call
    (``call`` recorded by :func:`~alignscope.models.capture.capture_token_calls`), else position ``t`` of a
    full-sequence call (every other token's input held fixed)."""
    x = call.input[0].to(dtype)  # [T, d]
    if t is None:
        fn = token_block_function(block, call, adapter, dtype)
        d = x.shape[-1]
        return (lambda v: fn(v.view(1, 1, d)).view(d)), x[0]
    fn = block_function(block, call, adapter, dtype)
    before, after = x[:t], x[t + 1 :]
    return (lambda v: fn(torch.cat([before, v[None], after])[None])[0, t]), x[t]


def sketch_token(
    calls: list[BlockCall],
    blocks,
    adapter,
    probed: list[int],
    ks: list[int],
    engine: RandomizedSVD,
    dtype: torch.dtype,
    t: int | None,
    chunk_size: int,
    chain: bool,
    bar: Any,
    copies: bool = False,
) -> dict[str, Any]:
    """Factors, projections and the linearization chain for one token (see the module docstring).
    ``copies``: run the products on copies of the token (single-token calls with a long context on CUDA,
    :func:`alignscope.probing.plan.copies_plan`; blocks that cannot take copies fall back to batched products)."""

    def operator(layer: int) -> LinearizedBlock:  # built when needed: a block not in `dtype` is a cast copy
        fn, x = row_function(blocks[layer], calls[layer], adapter, dtype, t)
        copies_fn = token_copies_function(blocks[layer], calls[layer], adapter, dtype) if copies else None
        return LinearizedBlock(fn, x, chunk_size, copies_fn)

    d = calls[0].input.shape[-1]
    kmax = min(max(ks), d)
    sketches: list[LowRank] = []
    z = calls[0].input[0, 0 if t is None else t].to(dtype) if chain else None
    for layer in probed:
        op = operator(layer)
        sketches.append(engine(op, kmax))
        if chain:
            z = z + op.jvp(z[None])[0]
        del op
    U = torch.stack([s.U for s in sketches])  # [L', d, r]
    V = torch.stack([s.V for s in sketches])
    right_u, right_v = U[..., :kmax], V[..., :kmax]
    n = len(probed)
    ujv = torch.empty(n, n, kmax, kmax, dtype=dtype, device=U.device)
    vju = torch.empty_like(ujv)
    stacked_v = right_v.permute(0, 2, 1).reshape(n * kmax, d)  # rows v_{j,k}
    stacked_u = right_u.permute(0, 2, 1).reshape(n * kmax, d)
    for i, layer in enumerate(probed):
        op = operator(layer)
        jv = op.jvp(stacked_v).reshape(n, kmax, d)  # [j, l, a] = (J_i v_{j,l})_a
        ju = op.jvp(stacked_u).reshape(n, kmax, d)
        ujv[i] = torch.einsum("jak,jla->jkl", right_u, jv)  # U_j^T J_i V_j
        vju[i] = torch.einsum("jak,jla->jkl", right_v, ju)  # V_j^T J_i U_j
        del op
        bar.update(1)
    return {
        "U": U,
        "S": torch.stack([s.S for s in sketches]),
        "V": V,
        "residuals": torch.stack([s.residuals for s in sketches]),
        "tail_fro": torch.stack([s.tail_fro for s in sketches]),
        "fro2": torch.stack([s.fro2 for s in sketches]),
        "ujv": ujv,
        "vju": vju,
        "chain": z,
    }


def analyze_sketch(sk: dict[str, Any], traj: Tensor, layers: list[int], ks: list[int]) -> dict[str, Any]:
    """The per-token metrics of :func:`alignscope.probing.probe._analyze` from :func:`sketch_token`'s output, plus
    the error statement in ``extras``-named keys (``triplet_residuals``, ``tail_fro``,
    ``coupling_error_k{K}``)."""
    S, U, V = sk["S"], sk["U"], sk["V"]
    d = U.shape[1]
    clipped = {k: min(k, d) for k in ks}
    depth = torch.tensor([layer + 1 for layer in layers])
    expo = metrics.expodistance(traj)
    inv_fit = metrics.inverse_top_singular_fit(S[:, 0], depth)
    coupling = metrics.coupling_from_projections(sk["ujv"], S, clipped)
    coupling_vju = metrics.coupling_from_projections(sk["vju"], S, clipped)
    angles = vector_angle_bounds(S, sk["residuals"], sk["tail_fro"])
    out: dict[str, Any] = {
        "hidden_states": traj,
        "singular_values": S,
        "nonfinite": ~torch.isfinite(S).all(-1),  # NaN triplets exactly where J was not finite
        "coupling": coupling,
        "coupling_vju": coupling_vju,
        "alignment": metrics.alignment_matrices(U, V, ks),
        "lss": metrics.line_shape_score(traj),
        "step_slope": expo.step_slope,
        "step_r2": expo.step_r2,
        "norm_slope": expo.norm_slope,
        "norm_r2": expo.norm_r2,
        # ||J||_F^2 = sum s_k^2 + tail_fro^2: the tail counts as one more term of stable_rank's sum
        "stable_rank": metrics.stable_rank(torch.cat([S, sk["tail_fro"][:, None]], -1)),
        "inv_s1_slope": inv_fit.slope,
        "inv_s1_r2": inv_fit.r2,
        "triplet_residuals": sk["residuals"],
        "tail_fro": sk["tail_fro"],
    }
    for k in ks:
        out[f"coupling_error_k{k}"] = coupling_error_bound(
            coupling[k], S, sk["residuals"], angles, clipped[k]
        )
    if sk["chain"] is not None:
        out["linearization_cosine"] = torch.nn.functional.cosine_similarity(sk["chain"], traj[-1], dim=0)
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

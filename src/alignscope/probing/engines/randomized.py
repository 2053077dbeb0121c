"""The randomized engine (``engine="randomized"``): per-token factors without forming any ``J``.

For one token and every probed block ``l`` (same block calls as the exact engines: the single-token call
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

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from alignscope.autodiff.linearized import LinearizedBlock
from alignscope.core.randomized import LowRank, RandomizedSVD
from alignscope.models.capture import (
    BlockCall,
    block_function,
    capture_block_calls,
    capture_tokens_calls,
    token_block_function,
    token_copies_function,
)
from alignscope.probing.engines.base import ProbeEngine, Target, TokenFactors, chain_gap, trajectory
from alignscope.probing.plan import Plan, randomized_products


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
    chain: int | None,
    bar: Any,
    copies: bool = False,
) -> dict[str, Any]:
    """Factors, projections and the linearization chain for one token (see the module docstring).
    ``blocks[layer]`` is the module re-called as block ``layer``; ``chain``: how many leading blocks the
    chain covers (every block must be probed), or None for no chain.
    ``copies``: run the products on copies of the token (single-token calls with a long context on CUDA,
    :meth:`alignscope.probing.plan.Plan.copies`; blocks that cannot take copies fall back to batched products)."""

    def operator(layer: int) -> LinearizedBlock:  # built when needed: a block not in `dtype` is a cast copy
        fn, x = row_function(blocks[layer], calls[layer], adapter, dtype, t)
        copies_fn = token_copies_function(blocks[layer], calls[layer], adapter, dtype) if copies else None
        return LinearizedBlock(fn, x, chunk_size, copies_fn)

    d = calls[0].input.shape[-1]
    kmax = min(max(ks), d)
    sketches: list[LowRank] = []
    home = calls[0].input.device  # with a device map each block runs on its own device; results go here
    z = calls[0].input[0, 0 if t is None else t].to(dtype) if chain is not None else None
    for layer in probed:
        op, device = operator(layer), calls[layer].input.device
        sketches.append(_moved(engine(op, kmax), home))
        if z is not None and chain is not None and layer < chain:
            z = z + op.jvp(z[None].to(device))[0].to(home)
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
        op, device = operator(layer), calls[layer].input.device
        jv = op.jvp(stacked_v.to(device)).to(home).reshape(n, kmax, d)  # [j, l, a] = (J_i v_{j,l})_a
        ju = op.jvp(stacked_u.to(device)).to(home).reshape(n, kmax, d)
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


def _moved(sketch: LowRank, device: torch.device) -> LowRank:
    """``sketch`` with every tensor on ``device``."""
    return LowRank(*(getattr(sketch, f.name).to(device) for f in fields(sketch)))


class RandomizedEngine(ProbeEngine):
    """Matrix-free top-Kmax triplets of every probed block (``engine="randomized"``, or a
    :class:`~alignscope.core.randomized.RandomizedSVD` instance to set its oversampling and power
    iterations), exact coupling projections and the chain by products (see the module docstring)."""

    name = "randomized"
    forms_jacobians = False

    def __init__(self, plan: Plan, chunk_size: int | None = None, sketch: RandomizedSVD | None = None):
        super().__init__(plan, chunk_size)
        self.sketch = sketch if sketch is not None else RandomizedSVD()

    def meta(self, target: Target, d: int, device: torch.device) -> dict[str, Any]:
        kmax = min(target.kmax, d)
        randomized = {
            "oversample": self.sketch.oversample,
            "power_iters": self.sketch.power_iters,
            "probes": self.sketch.probes,
            "seed": self.sketch.seed,
            "rank": self.sketch.rank(kmax, d),
            "products_per_block_token": randomized_products(self.sketch, kmax, d, len(target.probed)),
        }
        return {
            "engine": self.name,
            "randomized": randomized,
            "chunk_size": self.chunk_size,
            "copies_min_context": None,
            "analysis_svd": None,
        }

    def factors(self, target: Target, ids: Tensor, positions: list[int], bar: Any) -> Iterator[TokenFactors]:
        adapter, blocks = target.adapter, target.blocks
        if adapter.causal:  # the token alone against the KV cache: row None
            for t, calls in capture_tokens_calls(target.model, adapter, blocks, ids, positions):
                yield self._token(target, ids, t, target.with_final_norm(calls), None, bar)
        else:  # one full-sequence capture, row t of it
            calls = target.with_final_norm(capture_block_calls(target.model, adapter, blocks, ids))
            for t in positions:
                yield self._token(target, ids, t, calls, t, bar)

    def _token(
        self, target: Target, ids: Tensor, t: int, calls: list[BlockCall], row: int | None, bar: Any
    ) -> TokenFactors:
        adapter, blocks = target.adapter, target.blocks
        traj = trajectory(calls, row or 0).to(target.dtype)
        copies_at = self.plan.copies(ids.device, sketch=True)
        copies = adapter.causal and copies_at is not None and t >= copies_at[0]
        context = t if adapter.causal else calls[0].input.shape[1]  # tokens, also for pixel inputs
        chunk = self.chunk_size or (
            copies_at[1] if copies else self.plan.token_chunk(context, ids.device, traj.shape[-1])
        )
        sk = sketch_token(
            calls,
            [target.block(layer) for layer in range(len(blocks))],
            adapter,
            target.probed,
            [target.kmax],
            self.sketch,
            target.dtype,
            row,
            chunk,
            target.chain_length if target.every_block else None,
            bar,
            copies,
        )
        return TokenFactors(
            position=t,
            trajectory=traj,
            S=sk["S"],
            U=sk["U"],
            V=sk["V"],
            ujv=sk["ujv"],
            vju=sk["vju"],
            chain=sk["chain"],
            chain_gap=chain_gap(calls),
            residuals=sk["residuals"],
            tail_fro=sk["tail_fro"],
        )

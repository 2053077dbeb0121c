"""The exact engines: every residual Jacobian formed by reverse mode, then factored.

- :class:`SequenceEngine` (``"exact"``): reverse mode through the block's full-sequence call, every other
  token's input held fixed (any model, and any :class:`~alignscope.autodiff.jacobian.JacobianEngine`).
- :class:`SingleTokenEngine` (``"single_token"``): the block called on the probed token alone against the
  model's KV cache of the earlier tokens; the same Jacobian, far cheaper for long prompts (causal decoders).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from alignscope.autodiff.jacobian import (
    JacobianEngine,
    ReverseModeEngine,
    jacobian_by_copies,
    make_engine,
    residual_jacobian,
)
from alignscope.core import factorization, metrics
from alignscope.models.capture import (
    block_function,
    capture_block_calls,
    capture_tokens_calls,
    token_block_function,
    token_copies_function,
)
from alignscope.probing.engines.base import ProbeEngine, Target, TokenFactors, chain_gap, trajectory
from alignscope.probing.plan import Plan


class ExactEngine(ProbeEngine):
    """An engine that forms each residual Jacobian ``[L', d, d]``; factoring is shared (:meth:`factor`)."""

    @abstractmethod
    def jacobians(
        self, target: Target, ids: Tensor, positions: list[int], bar: Any
    ) -> Iterator[tuple[int, Tensor, Tensor, float]]:
        """Per token of ``positions``: ``(t, J [L', d, d], trajectory [L + 1, d], chain gap)``."""

    def factors(self, target: Target, ids: Tensor, positions: list[int], bar: Any) -> Iterator[TokenFactors]:
        for t, jac, traj, gap in self.jacobians(target, ids, positions, bar):
            yield self.factor(target, t, jac, traj, gap)

    def factor(self, target: Target, t: int, jac: Tensor, traj: Tensor, gap: float) -> TokenFactors:
        """Every singular value, the top-Kmax vectors and the projections of ``jac`` (timed as analysis)."""
        if jac.is_cuda:  # do not count the Jacobians' queued kernels as analysis
            torch.cuda.synchronize(jac.device)
        start = time.perf_counter()
        kmax = min(target.kmax, jac.shape[-1])
        svd = factorization.top_svd(jac, kmax, self.plan.analysis_method(jac.device))
        factors = TokenFactors(
            position=t,
            trajectory=traj,
            S=svd.S,
            U=svd.U,
            V=svd.V,
            ujv=metrics.coupling_projections(jac, svd, kmax, "ujv"),
            vju=metrics.coupling_projections(jac, svd, kmax, "vju"),
            chain=metrics.linearized_chain(jac[: target.chain_length], traj[0])
            if target.every_block
            else None,
            chain_gap=gap,
            jacobians=jac,
        )
        if jac.is_cuda:
            torch.cuda.synchronize(jac.device)
        self.analysis_seconds += time.perf_counter() - start
        return factors

    def meta(self, target: Target, d: int, device: torch.device) -> dict[str, Any]:
        return {
            "engine": self.name,
            "randomized": None,
            "chunk_size": self.meta_chunk_size(),
            "copies_min_context": None,
            "analysis_svd": self.plan.analysis_method(device),
        }

    def meta_chunk_size(self) -> int | str | None:
        return self.chunk_size


class SequenceEngine(ExactEngine):
    """Reverse mode through each block's full-sequence call (``engine="exact"``), or any
    :class:`~alignscope.autodiff.jacobian.JacobianEngine` passed as ``engine``."""

    name = "exact"

    def __init__(self, plan: Plan, chunk_size: int | None = None, method: JacobianEngine | None = None):
        super().__init__(plan, chunk_size)
        self.method = (
            method
            if method is not None
            else make_engine("reverse", chunk_size=chunk_size or plan.sequence_chunk)
        )

    def meta_chunk_size(self) -> int | None:
        return getattr(self.method, "chunk_size", None)

    def jacobians(self, target: Target, ids: Tensor, positions: list[int], bar: Any):
        blocks, dtype = target.blocks, target.dtype
        calls = target.with_final_norm(capture_block_calls(target.model, target.adapter, blocks, ids))
        gap = chain_gap(calls)
        pos = torch.tensor(positions, dtype=torch.long)
        traj = torch.stack([trajectory(calls, t) for t in positions]).to(dtype)  # [P, L + 1, d]
        d = traj.shape[-1]
        jac = torch.empty(len(pos), len(target.probed), d, d, dtype=dtype, device=traj.device)
        for li, layer in enumerate(target.probed):
            call = calls[layer]
            fn = block_function(target.block(layer), call, target.adapter, dtype)
            x = call.input[0].to(dtype)
            p = pos.to(x.device)
            jac[:, li] = residual_jacobian(self.method(fn, x, p, p)).to(jac.device)
            bar.update(len(pos))
        return [(t, jac[n], traj[n], gap) for n, t in enumerate(positions)]


class SingleTokenEngine(ExactEngine):
    """Reverse mode through each block called on the probed token alone, against the KV cache of the
    earlier tokens (``engine="single_token"``). Rows per product follow the context length
    (:meth:`Plan.token_chunk`) unless ``chunk_size`` is given; on the plan's copies devices, long contexts
    run copies of the token instead (:meth:`Plan.copies`; blocks that cannot take copies keep the batched
    products)."""

    name = "single_token"
    needs_causal = True

    def __init__(self, plan: Plan, chunk_size: int | None = None) -> None:
        super().__init__(plan, chunk_size)
        self.reverse = ReverseModeEngine(chunk_size=chunk_size or plan.token_chunk_max)

    @property
    def adaptive(self) -> bool:
        """Whether rows per product (and copies) follow the plan rather than a fixed ``chunk_size``."""
        return self.chunk_size is None

    def meta(self, target: Target, d: int, device: torch.device) -> dict[str, Any]:
        out = super().meta(target, d, device)
        copies = self.plan.copies(device) if self.adaptive else None
        out["copies_min_context"] = None if copies is None else copies[0]
        return out

    def meta_chunk_size(self) -> int | str:
        return "adaptive" if self.adaptive else self.chunk_size

    def jacobians(self, target: Target, ids: Tensor, positions: list[int], bar: Any):
        for t, raw in capture_tokens_calls(target.model, target.adapter, target.blocks, ids, positions):
            calls = target.with_final_norm(raw)
            traj = trajectory(calls, 0).to(target.dtype)
            d = traj.shape[-1]
            copies_at = self.plan.copies(traj.device) if self.adaptive else None
            copies_chunk = copies_at[1] if copies_at is not None and t >= copies_at[0] else None
            if self.adaptive:
                self.reverse.chunk_size = self.plan.token_chunk(t, traj.device, d)
            jac = torch.empty(len(target.probed), d, d, dtype=target.dtype, device=traj.device)
            for li, layer in enumerate(target.probed):
                jac[li] = self._block_jacobian(target, calls[layer], layer, copies_chunk).to(jac.device)
                bar.update(1)
            yield t, jac, traj, chain_gap(calls)

    def _block_jacobian(self, target: Target, call, layer: int, copies_chunk: int | None) -> Tensor:
        """``J_l`` ``[d, d]`` at the token: on copies of the token when ``copies_chunk`` is set and the block
        takes copies, else by batched VJPs."""
        block, adapter, dtype = target.block(layer), target.adapter, target.dtype
        x = call.input[0].to(dtype)  # [1, d]
        copies_fn = token_copies_function(block, call, adapter, dtype) if copies_chunk else None
        if copies_fn is not None:
            return residual_jacobian(jacobian_by_copies(copies_fn, x[0], copies_chunk))
        fn = token_block_function(block, call, adapter, dtype)
        zero = torch.zeros(1, dtype=torch.long, device=x.device)
        return residual_jacobian(self.reverse(fn, x, zero, zero)[0])

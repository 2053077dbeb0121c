"""The interface every probe engine implements, and what it hands to the analysis.

An engine turns one prompt's probed tokens into :class:`TokenFactors`: the token's trajectory, the top-Kmax
singular triplets of each probed block's residual Jacobian ``J_l = d x^l_t / d x^{l-1}_t - I``, the coupling
projections ``U_j^T J_i V_j`` and ``V_j^T J_i U_j``, and the linearized chain. From these,
:func:`alignscope.probing.analysis.analyze` computes every metric, so the metrics cannot depend on how the
factors were obtained. Engines differ only in how they reach ``J`` (a full-sequence call, the token alone
against the KV cache, or products without forming ``J``). Adding an engine is one subclass of
:class:`ProbeEngine` and its entry in :data:`alignscope.probing.engines.ENGINES`.
"""

from __future__ import annotations

import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from alignscope.models.adapters import BlockAdapter
from alignscope.models.capture import BlockCall
from alignscope.probing.plan import Plan


@dataclass
class Target:
    """What an engine probes: the model, its adapter and blocks, the probed block indices ``probed`` (``L'``
    of them, 0-based, ascending), the largest K, the compute dtype, the model's final norm when the last
    block's output is taken after it (``include_final_norm``, else None), and how many leading blocks the
    linearized chain covers (``chain_blocks``, None: all)."""

    model: nn.Module
    adapter: BlockAdapter
    blocks: Any
    probed: list[int]
    kmax: int
    dtype: torch.dtype
    final_norm: nn.Module | None = None
    chain_blocks: int | None = None

    @property
    def every_block(self) -> bool:
        """True when every block is probed (then the linearized chain is defined)."""
        return len(self.probed) == len(self.blocks)

    @property
    def chain_length(self) -> int:
        """The number of leading blocks in the linearized chain ``(I + J_n) ... (I + J_1) x^0``."""
        return len(self.blocks) if self.chain_blocks is None else self.chain_blocks

    def block(self, layer: int) -> nn.Module:
        """The module to re-call as block ``layer``: the model's own block, or for the last block with a
        final norm, the block followed by the norm (:class:`NormedBlock`)."""
        block = self.blocks[layer]
        if self.final_norm is None or layer != len(self.blocks) - 1:
            return block
        return NormedBlock(block, self.final_norm, self.adapter)

    def with_final_norm(self, calls: list[BlockCall]) -> list[BlockCall]:
        """``calls`` with the last block's recorded output passed through the final norm (if any)."""
        if self.final_norm is None:
            return calls
        last = calls[-1]
        with torch.no_grad():
            normed = self.final_norm(last.output)
        return [*calls[:-1], dataclasses.replace(last, output=normed)]


class NormedBlock(nn.Module):
    """A block followed by the model's final norm: the map ``x^{L-1} -> norm(x^L)`` that Hugging Face's last
    two ``output_hidden_states`` entries span. Called with the block's own arguments; returns ``[..., d]``."""

    def __init__(self, block: nn.Module, norm: nn.Module, adapter: BlockAdapter) -> None:
        super().__init__()
        self.block, self.norm, self.adapter = block, norm, adapter

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.norm(self.adapter.hidden_from_output(self.block(*args, **kwargs)))


@dataclass
class TokenFactors:
    """One probed token, as an engine hands it to the analysis (tensors on the engine's device).

    Attributes:
        position: the token's position within its prompt's real tokens.
        trajectory: ``[L + 1, d]`` ``x^0..x^L`` of the token, in the compute dtype.
        S: ``[L', r]`` singular values of each residual Jacobian, descending (exact engines: all ``d``;
            the randomized engine: the top ``r = Kmax + oversample``).
        U, V: ``[L', d, >= Kmax]`` left and right singular vectors (columns), top first.
        ujv, vju: ``[L', L', Kmax, Kmax]``, ``ujv[i, j] = U_{j,Kmax}^T J_i V_{j,Kmax}`` and ``vju[i, j] =
            V_{j,Kmax}^T J_i U_{j,Kmax}``; every ``m_K`` reads their top-left ``K x K`` blocks.
        chain: ``[d]`` ``(I + J_L) ... (I + J_1) x^0`` when every block is probed, else None.
        chain_gap: largest relative gap between block l's output and block l+1's input (0 for a plain chain).
        jacobians: ``[L', d, d]`` residual Jacobians (exact engines), else None.
        residuals: ``[L', Kmax]`` ``||J v_k - s_k u_k||`` (randomized engine), else None.
        tail_fro: ``[L']`` ``||J - U U^T J||_F`` estimate (randomized engine), else None.
    """

    position: int
    trajectory: Tensor
    S: Tensor
    U: Tensor
    V: Tensor
    ujv: Tensor
    vju: Tensor
    chain: Tensor | None
    chain_gap: float
    jacobians: Tensor | None = None
    residuals: Tensor | None = None
    tail_fro: Tensor | None = None


class ProbeEngine(ABC):
    """How the residual Jacobians of the probed blocks are reached, token by token.

    Class attributes: ``name`` (``meta["engine"]``), ``forms_jacobians`` (whether ``J`` exists, so
    ``keep_jacobians`` can be honoured), ``needs_causal`` (only for causal decoders with a KV cache).
    """

    name: ClassVar[str]
    forms_jacobians: ClassVar[bool] = True
    needs_causal: ClassVar[bool] = False

    def __init__(self, plan: Plan, chunk_size: int | None = None) -> None:
        self.plan = plan
        self.chunk_size = chunk_size
        self.analysis_seconds = 0.0  # time spent factoring formed Jacobians (exact engines)

    @abstractmethod
    def factors(self, target: Target, ids: Tensor, positions: list[int], bar: Any) -> Iterator[TokenFactors]:
        """The factors of each token of ``positions`` (ascending) of the prompt ``ids`` ``[1, T]`` (on the
        model's input device), in order; ``bar.update(n)`` after each ``n`` block-tokens."""

    @abstractmethod
    def meta(self, target: Target, d: int, device: torch.device) -> dict[str, Any]:
        """The engine's facts for ``ProbeResult.meta``: ``engine``, ``randomized``, ``chunk_size``,
        ``copies_min_context``, ``analysis_svd``."""


def trajectory(calls: list[BlockCall], position: int) -> Tensor:
    """``x^0..x^L`` (``[L + 1, d]``) of the token at ``position`` of the recorded calls' sequence."""
    device = calls[0].input.device
    return torch.stack([calls[0].input[0, position]] + [c.output[0, position].to(device) for c in calls])


def chain_gap(calls: list[BlockCall]) -> float:
    """Largest relative gap between block l's output and block l+1's input (0 for a plain block chain)."""
    gap = 0.0
    for prev, nxt in itertools.pairwise(calls):
        a, b = prev.output.float(), nxt.input.float().to(prev.output.device)
        gap = max(gap, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return gap

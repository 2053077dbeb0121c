"""Context coupling: ``m_K`` between the cross-token Jacobians ``J^l_{t1 -> t2} = d x^l_{t2} / d x^{l-1}_{t1}``
of one block, across output tokens for a fixed input token, or across input tokens for a fixed output token.

The Jacobians come from :func:`alignscope.probing.probe.token_jacobians`; where ``t1 == t2`` the identity is
subtracted (the residual Jacobian), elsewhere the residual stream does not reach ``t2`` from ``t1`` directly,
so ``J`` is the attention path alone. In a causal model ``t2 >= t1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignscope.core.token_coupling import coupling_across
from alignscope.models import get_adapter, resolve_layers
from alignscope.probing.probe import token_jacobians


@dataclass
class ContextCoupling:
    """``coupling[K]`` ``[L', n, n]``: ``[l, a, b] = m_K(J^l_a, J^l_b)`` over the ``n`` token pairs ``pairs``
    (``[n, 2]``, ``(t1, t2)``), which share ``t1`` (``fixed="input"``) or ``t2`` (``fixed="output"``);
    ``layers``: the blocks (0-based)."""

    pairs: Tensor
    fixed: str
    layers: list[int]
    coupling: dict[int, Tensor]


def context_coupling(
    model: nn.Module,
    input_ids: Tensor | Sequence[int],
    layers: Sequence[int] | int | None = None,
    *,
    t_in: int | None = None,
    t_out: int | None = None,
    ks: Sequence[int] = (10,),
    normalization: str = "norm",
    p: float = 2.0,
    dtype: torch.dtype = torch.float32,
) -> ContextCoupling:
    """Coupling of one prompt's cross-token Jacobians, per block: fix ``t_in`` (every output token it
    reaches: ``t_in..T-1`` in a causal model, all tokens in an encoder) or ``t_out`` (every input token that
    reaches it: ``0..t_out`` causal, all tokens otherwise); exactly one of them. ``input_ids``: ``[T]`` or
    ``[1, T]``. Costs one Jacobian per (pair, block)."""
    if (t_in is None) == (t_out is None):
        raise ValueError("give exactly one of t_in (fixed input token) or t_out (fixed output token)")
    ids = torch.as_tensor(input_ids).reshape(-1)
    length, causal = len(ids), get_adapter(model).attends_back_only
    fixed_at = t_in if t_in is not None else t_out
    if not -length <= fixed_at < length:
        raise IndexError(f"token {fixed_at} is beyond the prompt's {length} tokens")
    fixed_at %= length
    if t_in is not None:
        others = range(fixed_at, length) if causal else range(length)
        pairs = [(fixed_at, t) for t in others]
    else:
        others = range(fixed_at + 1) if causal else range(length)
        pairs = [(t, fixed_at) for t in others]
    probed = resolve_layers(layers, len(get_adapter(model).blocks(model)))
    jac = token_jacobians(model, ids, probed, pairs, dtype=dtype)  # [n, L', d, d]
    same = torch.tensor([a == b for a, b in pairs])
    jac[same] -= torch.eye(jac.shape[-1], dtype=jac.dtype)
    coupling = [coupling_across(jac[:, i], list(ks), normalization, p) for i in range(len(probed))]
    return ContextCoupling(
        pairs=torch.tensor(pairs),
        fixed="input" if t_in is not None else "output",
        layers=probed,
        coupling={k: torch.stack([c[k] for c in coupling]) for k in ks},
    )

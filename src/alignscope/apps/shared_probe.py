"""The monitor's probe shared by the ranks of a distributed run (DDP): each rank probes its share of the
prompts, rank 0 joins the shares in prompt order.

With ``n`` prompts and ``w`` ranks, rank ``r`` probes the contiguous prompts ``[r n // w, (r + 1) n // w)``;
with fewer prompts than ranks some ranks get none and compute nothing. The per-rank results (on the CPU)
are gathered with ``torch.distributed.all_gather_object`` and joined by :meth:`ProbeResult.concat`, so the
joined result is the single-process probe of all prompts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings


def shares(num_prompts: int, world_size: int) -> list[range]:
    """The prompt indices each rank probes: contiguous, in rank order, sizes differing by at most one."""
    return [
        range(r * num_prompts // world_size, (r + 1) * num_prompts // world_size) for r in range(world_size)
    ]


def shared_probe(
    model: nn.Module, prompts: list[list[int]], settings: ProbeSettings, rank: int, world_size: int
) -> ProbeResult | None:
    """Probe this rank's share of ``prompts`` and gather every share on rank 0 (a collective: every rank
    calls it). Returns the joined result on rank 0 (with more than one rank, ``meta["world_size"]`` and
    ``meta["prompts_per_rank"]`` say how it was split), and None on the other ranks."""
    from alignscope.probing.probe import probe

    split = shares(len(prompts), world_size)
    mine = [prompts[i] for i in split[rank]]
    result = probe(model, mine, settings=settings) if mine else None
    parts: list[Any] = [result]
    if world_size > 1:
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, result)
    if rank != 0:
        return None
    if world_size == 1:
        return result
    joined = ProbeResult.concat([p for p in parts if p is not None])
    counts = [len(p.meta["prompt_lengths"]) if p is not None else 0 for p in parts]  # what each rank probed
    joined.meta.update(world_size=world_size, prompts_per_rank=counts)
    return joined

"""An independent block Jacobian, by autograd through the whole model's own forward.

Used to check every engine and every discovered adapter: nothing of the capture and re-call machinery
(:mod:`alignscope.models.capture`) is involved, only two hooks on the block and
``torch.autograd.functional.jacobian``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.models.adapters import get_adapter


def perturbed_block_output(
    model: nn.Module, inputs: Tensor, layer: int, t_in: Any, t_out: int
) -> Callable[[Tensor], Tensor]:
    """``delta [d] -> x^layer_{t_out}``: the whole model run on ``inputs`` with ``delta`` added to block
    ``layer``'s input at token(s) ``t_in`` (a list: the same ``delta`` at each) by a forward pre-hook, the
    block's output at ``t_out`` read by a forward hook. ``inputs``: ``[1, T]`` token ids, or ``[1, C, H, W]``
    pixels for a vision model (passed as the keyword its adapter names)."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[layer]
    positions = [t_in] if isinstance(t_in, int) else list(t_in)
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def run(delta: Tensor) -> Tensor:
        seen = {}

        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, positions] = h[:, positions] + delta
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def post(module, args, kwargs, output):
            seen["y"] = adapter.hidden_from_output(output)[0, t_out]

        handles = [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True),
        ]
        try:
            model(**{adapter.inputs: inputs}, **no_cache)
        finally:
            for h in handles:
                h.remove()
        return seen["y"]

    return run


def reference_jacobian(model: nn.Module, inputs: Tensor, layer: int, t_in: Any, t_out: int) -> Tensor:
    """``d x^layer_{t_out} / d x^{layer-1}_{t_in}`` ``[d, d]`` by ``torch.autograd.functional.jacobian`` of
    :func:`perturbed_block_output` at ``delta = 0``. The identity is not subtracted."""
    run = perturbed_block_output(model, inputs, layer, t_in, t_out)
    with torch.no_grad():
        width = run(torch.zeros(())).shape[-1]
    return torch.autograd.functional.jacobian(run, torch.zeros(width))

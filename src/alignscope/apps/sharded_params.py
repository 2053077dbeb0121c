"""Full parameters of an FSDP-sharded model for the monitor's probe (and its weights hash).

Under FSDP each rank holds a shard of every parameter; the modules that run forward between FSDP's own hooks
see the full parameters only for the duration of their forward. The probe calls the model and its blocks
outside FSDP's forward, so :func:`full_params` gathers the full parameters first:

- FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``):
  ``FullyShardedDataParallel.summon_full_params(scope, recurse=True, writeback=False)``, a collective every
  rank enters; the probed module is the model with its FSDP wrappers looked through
  (``FullyShardedDataParallel.module``). On exit the full parameters are freed and every rank holds its
  shard again, unchanged (no writeback); gradients and optimizer state are not touched.
- Models without FSDP1 modules: nothing is gathered, the model itself is probed.

While the context is open every rank holds the full parameters of the whole model (the memory of one
unsharded copy, in the parameters' dtype, on the parameters' device) on top of its shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _fsdp_class() -> type | None:
    """``FullyShardedDataParallel``, or None where torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def is_sharded(scope: nn.Module | None) -> bool:
    """Whether ``scope`` holds FSDP1 modules (then :func:`full_params` is a collective)."""
    fsdp = _fsdp_class()
    return scope is not None and fsdp is not None and any(isinstance(m, fsdp) for m in scope.modules())


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` without the FSDP1 wrapper(s) around it (the wrapped module itself)."""
    fsdp = _fsdp_class()
    while fsdp is not None and isinstance(model, fsdp):
        model = model.module
    return model


@contextlib.contextmanager
def full_params(scope: nn.Module | None, model: nn.Module) -> Iterator[nn.Module]:
    """Yield the module to probe for ``model`` with its full parameters while the context is open.

    ``scope``: the outermost module FSDP wrapped (Lightning's ``trainer.model``; it holds every FSDP unit
    of ``model``). When ``scope`` holds FSDP1 modules, every rank must enter (a collective), the full
    parameters are gathered with ``summon_full_params(recurse=True, writeback=False)`` and released on exit;
    otherwise ``model`` is yielded as it is.
    """
    if not is_sharded(scope):
        yield model
        return
    fsdp = _fsdp_class()
    assert fsdp is not None and scope is not None
    with fsdp.summon_full_params(scope, recurse=True, writeback=False):
        yield unwrapped(model)

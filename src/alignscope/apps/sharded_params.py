"""Full parameters of an FSDP-sharded model for the monitor's probe (and its weights hash).

Under FSDP each rank holds a shard of every parameter; the modules that run forward between FSDP's own hooks
see the full parameters only for the duration of their forward. The probe calls the model and its blocks
outside FSDP's forward, so :func:`full_params` gathers the full parameters first:

- FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``):
  ``FullyShardedDataParallel.summon_full_params(scope, recurse=True, writeback=False)``, a collective every
  rank enters. The probed module is the model with every FSDP unit bypassed: each unit inside it (one per
  decoder layer under an auto-wrap policy) is replaced in its parent by the module it wraps while the
  context is open, so the probe's forwards and backwards are plain module calls on the gathered
  parameters and FSDP runs no forward, gather or gradient hook during the probe (FSDP allows no forward
  inside ``summon_full_params``). On exit the units are put back, the full parameters are freed and every
  rank holds its shard again, unchanged (no writeback); gradients and optimizer state are not touched.
- Parameters that are ``DTensor`` s (FSDP2's ``fully_shard``, Lightning's ``ModelParallelStrategy``, tensor
  parallelism) are refused with an error that says so: the probe would read shards as if they were weights.
- Models without either: nothing is gathered, the model itself is probed.

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


def refuse_dtensor_parameters(module: nn.Module) -> None:
    """Raise when ``module`` has ``DTensor`` parameters (FSDP2 or tensor parallelism), which the probe
    cannot read."""
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor

    names = [name for name, p in module.named_parameters() if isinstance(p, DTensor)]
    if names:
        raise RuntimeError(
            f"the model's parameters are DTensors ({len(names)}, e.g. {names[0]!r}): FSDP2 (fully_shard, "
            "Lightning's ModelParallelStrategy) and tensor parallelism are not supported by the "
            "AlignmentMonitor, which would read each rank's shard as if it were the weights; train with "
            "Lightning's FSDPStrategy (FSDP1) or DDP, or probe a checkpoint of the full model with alignscope.probe()"
        )


@contextlib.contextmanager
def full_params(scope: nn.Module | None, model: nn.Module) -> Iterator[nn.Module]:
    """Yield the module to probe for ``model`` with its full parameters while the context is open.

    ``scope``: the outermost module FSDP wrapped (Lightning's ``trainer.model``; it holds every FSDP unit
    of ``model``). When ``scope`` holds FSDP1 modules, every rank must enter (a collective), the full
    parameters are gathered with ``summon_full_params(recurse=True, writeback=False)`` and released on exit;
    otherwise ``model`` is yielded as it is.
    """
    refuse_dtensor_parameters(scope if scope is not None else model)
    if not is_sharded(scope):
        yield model
        return
    fsdp = _fsdp_class()
    assert fsdp is not None and scope is not None
    with fsdp.summon_full_params(scope, recurse=True, writeback=False):
        root = unwrapped(model)
        with _units_bypassed(root, fsdp):
            yield root


@contextlib.contextmanager
def _units_bypassed(root: nn.Module, fsdp: type) -> Iterator[None]:
    """Every FSDP unit inside ``root`` replaced in its parent by the module it wraps; put back on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        stack = [root]
        while stack:
            parent = stack.pop()
            for name, child in list(parent.named_children()):
                if isinstance(child, fsdp):
                    inner = child
                    while isinstance(inner, fsdp):
                        inner = inner.module
                    setattr(parent, name, inner)
                    swapped.append((parent, name, child))
                    child = inner
                stack.append(child)
        yield
    finally:
        for parent, name, unit in reversed(swapped):
            setattr(parent, name, unit)

"""The probe engines behind one interface (:class:`ProbeEngine`), their registry, and the choice
``engine="auto"`` makes (:func:`select_engine`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignscope.autodiff.jacobian import make_engine
from alignscope.core.randomized import RandomizedSVD
from alignscope.models import config_attr, get_adapter, resolve_layers
from alignscope.probing.engines.base import ProbeEngine, Target, TokenFactors
from alignscope.probing.engines.exact import ExactEngine, SequenceEngine, SingleTokenEngine
from alignscope.probing.engines.randomized import RandomizedEngine
from alignscope.probing.plan import Plan

ENGINES: dict[str, type[ProbeEngine]] = {
    engine.name: engine for engine in (SequenceEngine, SingleTokenEngine, RandomizedEngine)
}
"""Every engine by name (``meta["engine"]``); a new engine is one class added here."""
ALIASES = {"reverse": "exact"}


def engine_names() -> tuple[str, ...]:
    """Every name ``engine=`` accepts: ``"auto"``, the registered engines and their aliases."""
    return ("auto", *ENGINES, *ALIASES)


def select_engine(
    engine: Any,
    plan: Plan,
    chunk_size: int | None,
    causal: bool,
    d: int | None,
    kmax: int,
    blocks: int,
    device: torch.device | str = "cpu",
) -> ProbeEngine:
    """The engine for ``engine`` (a name, a ``RandomizedSVD`` or a ``JacobianEngine`` instance). ``"auto"``:
    ``"randomized"`` when :meth:`Plan.auto_picks_randomized` (few enough products for ``blocks`` probed
    blocks of width ``d``), else ``"single_token"`` for causal decoders and ``"exact"`` otherwise."""
    if isinstance(engine, RandomizedSVD):
        return RandomizedEngine(plan, chunk_size, engine)
    if engine is not None and not isinstance(engine, str):
        return SequenceEngine(plan, chunk_size, make_engine(engine))
    name = ALIASES.get(engine or "auto", engine or "auto")
    if name == "auto":
        if plan.auto_picks_randomized(kmax, d, blocks, device):
            name = "randomized"
        else:
            name = "single_token" if causal else "exact"
    if name not in ENGINES:
        raise ValueError(
            f"unknown engine {name!r}; choose one of {engine_names()}, or pass a JacobianEngine or a RandomizedSVD"
        )
    chosen = ENGINES[name]
    if chosen.needs_causal and not causal:
        raise ValueError(f"engine={name!r} needs a causal decoder with a KV cache; use engine='exact'")
    return chosen(plan, chunk_size)


def planned_engine(model: nn.Module, settings: Any, plan: Plan | None = None) -> str:
    """The engine :func:`alignscope.probe` will run with ``settings`` (a ``ProbeSettings``): ``"exact"``,
    ``"single_token"`` or ``"randomized"`` (e.g. to skip ``keep_blocks``, which needs Jacobians)."""
    adapter = get_adapter(model)
    probed = resolve_layers(settings.layers, len(adapter.blocks(model)))
    d = config_attr(model, "hidden_size")
    ks = settings.ks_for(d)[0]
    chosen = select_engine(
        settings.engine,
        plan or Plan(),
        None,
        adapter.causal,
        d,
        max(ks),
        len(probed),
        input_device(model),
    )
    return chosen.name


def input_device(model: nn.Module) -> torch.device:
    """The device of the model's inputs (its ``device`` attribute, else its first parameter's)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


__all__ = [
    "ENGINES",
    "ExactEngine",
    "ProbeEngine",
    "RandomizedEngine",
    "SequenceEngine",
    "SingleTokenEngine",
    "Target",
    "TokenFactors",
    "engine_names",
    "input_device",
    "planned_engine",
    "select_engine",
]

"""Checks of the :class:`~alignscope.apps.callback.AlignmentMonitor` arguments, each failing with what to change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alignscope.core.randomized import RandomizedSVD
from alignscope.probing.settings import ProbeSettings, ProbeSettingsError


class MonitorConfigError(ValueError):
    """An AlignmentMonitor argument that cannot work; the message says what to change."""


def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` must be an int >= 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MonitorConfigError(f"AlignmentMonitor: {name} must be a positive integer, got {value!r}")


def true_or_false(name: str, value: Any) -> None:
    """``value`` must be a bool."""
    if not isinstance(value, bool):
        raise MonitorConfigError(f"AlignmentMonitor: {name} must be true or false, got {value!r}")


def monitor_settings(
    probe: ProbeSettings | None,
    layers: Sequence[int] | None,
    tokens: str | Sequence[int],
    ks: Sequence[int] | str,
    chunk_size: int | None,
    engine: str | RandomizedSVD,
) -> ProbeSettings:
    """The probe settings, given either whole (``probe``) or one by one (the other arguments), not both."""
    try:
        given = ProbeSettings(layers=layers, tokens=tokens, ks=ks, chunk_size=chunk_size, engine=engine)
    except ProbeSettingsError as err:
        raise MonitorConfigError(f"AlignmentMonitor: {err}") from None
    if probe is None:
        return given
    if not isinstance(probe, ProbeSettings):
        raise MonitorConfigError(
            f"AlignmentMonitor: probe must be an alignscope.ProbeSettings, got {type(probe).__name__}"
        )
    if given != ProbeSettings():
        raise MonitorConfigError(
            "AlignmentMonitor: give the probe settings either whole (probe=ProbeSettings(...)) or as "
            "arguments (layers, tokens, ks, chunk_size, engine), not both"
        )
    return probe


Prompts = torch.Tensor | list[torch.Tensor]
"""The monitor's prompts: ``[B, T]`` token ids, or one 1-D id tensor per prompt when their lengths differ."""


def text_prompts(prompts: Any) -> list[str] | None:
    """Given prompts as text (a string or a non-empty list of strings), else None."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and any(isinstance(p, str) for p in prompts):
        if not all(isinstance(p, str) and p for p in prompts):
            raise MonitorConfigError("AlignmentMonitor: text prompts must be a list of non-empty strings")
        return list(prompts)
    return None


def checked_prompts(prompts: torch.Tensor | Sequence[Sequence[int]] | None) -> Prompts | None:
    """Given prompts as a ``[B, T]`` long tensor of token ids, or one id tensor per prompt when the given id
    lists differ in length (None stays None: sampled or tokenized at fit start)."""
    if prompts is None:
        return None
    if not isinstance(prompts, torch.Tensor) and len({len(p) for p in prompts}) > 1:
        rows = [checked_prompts([p]) for p in prompts]
        return [row[0] for row in rows]
    prompts = torch.as_tensor(prompts)
    if prompts.ndim != 2 or prompts.numel() == 0 or prompts.dtype.is_floating_point:
        raise MonitorConfigError(
            "AlignmentMonitor: prompts must be a non-empty [B, T] tensor of token ids, id lists or a list of "
            "strings"
        )
    return prompts.long()


def prompt_lists(prompts: Prompts) -> list[list[int]]:
    """The prompts as plain id lists (for the state dict and the fingerprint)."""
    return prompts.tolist() if isinstance(prompts, torch.Tensor) else [p.tolist() for p in prompts]

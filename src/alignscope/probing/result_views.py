"""Views of a :class:`~alignscope.probing.result.ProbeResult`: its short text summary (``repr``) and its tidy
pandas frames (``to_frame``). pandas is imported only by :func:`frame`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from alignscope.core import metrics
from alignscope.probing.result import HEADLINE, format_scalars, tensor_fields

if TYPE_CHECKING:
    from alignscope.probing.result import ProbeResult

LEVELS = ("block", "token")
TOKEN_FITS = ("lss", "step_slope", "step_r2", "norm_slope", "norm_r2", "inv_s1_slope", "inv_s1_r2")
"""The ``[P]`` fields of a result, one value per probed token (with ``linearization_cosine`` when present)."""


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _shapes(result: ProbeResult) -> list[str]:
    """``"[shape]: name, name{K, K}, extra.name"`` lines, one per distinct shape, in field order."""
    by_shape: dict[str, list[str]] = {}
    for name, kind in tensor_fields(type(result)):
        value = getattr(result, name)
        if value is None:
            continue
        if kind == "keyed":
            shape = _shape(next(iter(value.values()))) if value else "[]"
            label = f"{name}{{{', '.join(str(k) for k in value)}}}"
        else:
            shape, label = _shape(value), name
        by_shape.setdefault(shape, []).append(label)
    for name, value in result.extras.items():
        by_shape.setdefault(_shape(value), []).append(f"extra.{name}")
    return [f"{shape}: {', '.join(names)}" for shape, names in by_shape.items()]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def describe(result: ProbeResult) -> str:
    """A few lines: model, settings (engine, dtype, ks, tokens), what was probed, the shape of every tensor
    (no values), the headline scalars present and the number of warnings."""
    meta = result.meta
    model = meta.get("model_class", "?")
    if meta.get("name_or_path"):
        model += f" {meta['name_or_path']!r}"
    details = [
        meta.get("model_type"),
        f"{meta.get('num_blocks', '?')} blocks",
        f"d={meta.get('d_model', '?')}",
    ]
    settings = f"engine={meta.get('engine', '?')}, dtype={meta.get('dtype', '?')}, ks={result.ks}"
    settings += f", tokens={meta.get('tokens', '?')!r}"
    prompts = len(meta.get("prompt_lengths", [])) or len(torch.unique(result.tokens[:, 0]))
    lines = [
        f"ProbeResult({model} ({', '.join(str(d) for d in details if d)})",
        f"  {settings}",
        f"  {_count(len(result.tokens), 'token')} from {_count(prompts, 'prompt')}, layers {result.layers}",
        *(f"  {line}" for line in _shapes(result)),
    ]
    own = tuple(f"coupling/k{k}" for k in result.ks if f"coupling/k{k}" not in HEADLINE)
    scalars = result.scalars()
    table = format_scalars(scalars, own + HEADLINE, indent="    ") if scalars else ""
    if table:
        lines += ["  scalars (means over tokens):", table]
    warnings = meta.get("warnings") or []
    if warnings:
        lines.append(f"  {len(warnings)} warning(s) in meta['warnings']")
    return "\n".join(lines) + "\n)"


def _np(t: torch.Tensor) -> Any:
    return t.detach().cpu().numpy()


def block_columns(result: ProbeResult) -> dict[str, Any]:
    """Columns of the block frame: one entry per (probed token, probed block), tokens outer, blocks inner."""
    p, n = result.singular_values.shape[:2]
    columns: dict[str, Any] = {
        "prompt": _np(result.tokens[:, 0].repeat_interleave(n)),
        "position": _np(result.tokens[:, 1].repeat_interleave(n)),
        "block": _np(torch.tensor(result.layers, dtype=torch.long).repeat(p)),
        "s1": _np(result.singular_values[..., 0].reshape(-1)),
        "stable_rank": _np(result.stable_rank.reshape(-1)),
        "nonfinite": _np(result.nonfinite.reshape(-1)),
    }
    for k in result.ks:
        columns[f"coupling_k{k}"] = _np(metrics.coupling_per_block(result.coupling[k]).reshape(-1))
        columns[f"coupling_vju_k{k}"] = _np(metrics.coupling_per_block(result.coupling_vju[k]).reshape(-1))
        within = torch.diagonal(result.alignment[k], dim1=-2, dim2=-1)
        columns[f"alignment_k{k}"] = _np(within.reshape(-1))
    return columns


def token_columns(result: ProbeResult) -> dict[str, Any]:
    """Columns of the token frame: one entry per probed token."""
    columns: dict[str, Any] = {"prompt": _np(result.tokens[:, 0]), "position": _np(result.tokens[:, 1])}
    for name in TOKEN_FITS:
        columns[name] = _np(getattr(result, name))
    if result.linearization_cosine is not None:
        columns["linearization_cosine"] = _np(result.linearization_cosine)
    for k in result.ks:
        columns[f"coupling_k{k}"] = _np(metrics.coupling_summary(result.coupling[k]))
        columns[f"coupling_vju_k{k}"] = _np(metrics.coupling_summary(result.coupling_vju[k]))
        columns[f"alignment_k{k}"] = _np(torch.diagonal(result.alignment[k], dim1=-2, dim2=-1).mean(-1))
        columns[f"alignment_across_k{k}"] = _np(metrics.off_diagonal_mean(result.alignment[k]))
    return columns


def frame(result: ProbeResult, level: str = "block") -> Any:
    """The tidy ``pandas.DataFrame`` of :meth:`ProbeResult.to_frame` at ``level`` ("block" or "token")."""
    if level not in LEVELS:
        raise ValueError(f"level must be 'block' or 'token', got {level!r}")
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("ProbeResult.to_frame needs pandas: pip install pandas") from err
    columns = block_columns(result) if level == "block" else token_columns(result)
    return pd.DataFrame(columns)

"""Report tables: cells that are numbers or notes, mean and spread, Markdown with empty columns hidden.

A value that is meaningless is shown as a note, never as a number:

- a ratio whose denominator is ~0 (``|b| <= NEAR_ZERO * max(1, |a|)``);
- a coupling (or cross-block alignment) that is NaN because a single block was probed (no pair of blocks);
- a negative coupling ``1 - m_K^2``: unrelated bases give ``m_K > 1`` when K is a large share of d.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NEAR_ZERO = 1e-6
"""A denominator with ``|b| <= NEAR_ZERO * max(1, |a|)`` gives no ratio (a note instead)."""

PAIR_METRICS = ("coupling/", "coupling_vju/", "alignment_across/")
"""Scalars defined over pairs of distinct blocks (NaN with one probed block)."""


@dataclass(frozen=True)
class Note:
    """A table cell that replaces a meaningless number; ``text`` says why."""

    text: str

    def __str__(self) -> str:
        return self.text


Cell = float | int | str | Note | None


@dataclass
class RunContext:
    """What a value's meaning depends on: the number of probed blocks, the width d, and the scalars
    (for ``k_effective/k{K}``)."""

    blocks: int | None = None
    d: int | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_scalars(cls, scalars: Mapping[str, float], d: int | None) -> RunContext:
        """Blocks counted from the per-block ``spectra/s1/block_<l>`` scalars."""
        blocks = sum(1 for name in scalars if name.startswith("spectra/s1/block_")) or None
        return cls(blocks, d, scalars)


def _k_of(metric: str) -> int | None:
    part = metric.split("/")[1] if "/" in metric else ""
    return int(part[1:]) if part.startswith("k") and part[1:].isdigit() else None


def value_cell(metric: str, value: float | None, ctx: RunContext) -> Cell:
    """``value``, or a :class:`Note` when it has no meaning for this run (see the module docstring)."""
    if value is None or not metric.startswith(PAIR_METRICS):
        return value
    if math.isnan(value):
        return Note("n/a: 1 probed block, no pair") if ctx.blocks == 1 else value
    if value < 0 and metric.startswith(("coupling/", "coupling_vju/")):
        k = _k_of(metric)
        k_eff = int(ctx.scalars.get(f"k_effective/k{k}", k or 0))
        share = f"K={k_eff} is {k_eff / ctx.d:.0%} of d={ctx.d}" if ctx.d else f"K={k_eff}"
        return Note(f"n/a: negative, {share} (m_K > 1 for unrelated bases)")
    return value


def ratio_cell(a: Cell, b: Cell, what: str = "denominator") -> Cell:
    """``a / b``; a note when either is a note or ``b`` is ~0; None when either is missing."""
    if isinstance(a, Note) or isinstance(b, Note):
        return Note("n/a: see values")
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    if abs(b) <= NEAR_ZERO * max(1.0, abs(a)):
        return Note(f"n/a: {what} ~0 ({b:.2g})")
    return a / b


def difference_cell(a: Cell, b: Cell) -> Cell:
    """``b - a``; a note when either is a note."""
    if isinstance(a, Note) or isinstance(b, Note):
        return Note("n/a: see values")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    return b - a


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values) of the finite ``values``."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def fmt(x: Any) -> str:
    """A cell as text: notes as they are, floats with 4 significant digits, missing values empty."""
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def csv_value(x: Any) -> Any:
    """A cell for a CSV: numbers as they are, notes as their text (a CSV cell holds one or the other)."""
    return str(x) if isinstance(x, Note) else ("" if x is None else x)


def visible_columns(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> list[str]:
    """The columns with at least one non-empty cell."""
    return [c for c in cols if any(fmt(r.get(c)) != "" for r in rows)]


def markdown_table(
    rows: Sequence[Mapping[str, Any]], cols: Sequence[str], headers: Mapping[str, str] | None = None
) -> str:
    """A Markdown table of ``rows`` with the empty columns left out."""
    shown = visible_columns(rows, cols)
    head = [(headers or {}).get(c, c) for c in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], path: Path) -> Path:
    """``rows`` as CSV (every column, notes as text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: csv_value(r.get(c)) for c in cols} for r in rows)
    return path


def with_spread(mean: Cell, std: float | None) -> str:
    """``mean ± std`` (just the mean without a spread; the note for a note)."""
    if std is None or isinstance(mean, Note) or mean is None:
        return fmt(mean)
    return f"{fmt(mean)} ± {std:.2g}"

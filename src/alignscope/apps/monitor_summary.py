"""The monitor's end-of-fit summary: init and final value of each headline metric, and as a text table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from alignscope.probing.result import HEADLINE


def summarize(history: Sequence[dict[str, float]], seconds: float) -> dict[str, Any]:
    """Init (first probe) and final (latest probe) value of each headline metric, and their change."""
    first, last = history[0], history[-1]
    out: dict[str, Any] = {
        "init_step": first["step"],
        "final_step": last["step"],
        "monitor_seconds": seconds,
    }
    for name in HEADLINE:
        if name in first and name in last:
            a, b = first[name], last[name]
            out[name] = {"init": a, "final": b, "change": b - a}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short text table."""
    init, final = summary["init_step"], summary["final_step"]
    rows = [(k, v) for k, v in summary.items() if isinstance(v, dict)]
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  {'step ' + str(init):>12}  {'step ' + str(final):>12}  {'change':>9}"]
    for name, v in rows:
        lines.append(
            f"{name:<{width}}  {_fmt(v['init']):>12}  {_fmt(v['final']):>12}  {_fmt(v['change'], sign=True):>9}"
        )
    lines.append(f"(alignment monitor: {summary['monitor_seconds']:.1f} s in probes)")
    return "\n".join(lines)


PROBE_LINE_METRICS = ("coupling/k10", "alignment/k10", "lss/mean")
"""Headline metrics named in the monitor's line per probe (those the probe computed)."""


def probe_line(step: int, seconds: float, scalars: dict[str, float]) -> str:
    """One log line per probe: its step, its duration and a few headline numbers."""
    numbers = ", ".join(f"{k} {_fmt(scalars[k])}" for k in PROBE_LINE_METRICS if k in scalars)
    return f"alignment probe at step {step}: {seconds:.1f} s" + (f"; {numbers}" if numbers else "")


def _fmt(x: float, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:+.4f}" if sign else f"{x:.4f}"

"""Report-only figures: the headline metrics of a training sweep against step, one line per job."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def sweep_metrics_vs_step(
    jobs: Mapping[str, tuple[int, Sequence[Mapping[str, float]]]], names: Sequence[str]
) -> Any:
    """One panel per metric in ``names`` (those any job has), a line per job: ``jobs`` maps a job's label to
    its setting's index (the line colour; replicates share it) and its records ``{"step": N, name: value}``.
    The x axis is logarithmic (``step + 1``) when the steps span more than 100."""
    from alignscope.apps.plots import _plt

    plt = _plt()
    names = [n for n in names if any(n in r for _, recs in jobs.values() for r in recs)]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [r["step"] for _, recs in jobs.values() for r in recs]
    log_x = len(set(steps)) > 2 and max(steps) > 100
    styles = ("-", "--", ":", "-.")
    seen: dict[int, int] = {}
    for label, (setting, recs) in jobs.items():
        style = styles[seen.get(setting, 0) % len(styles)]
        seen[setting] = seen.get(setting, 0) + 1
        probed = [r for r in recs if "step" in r]
        xs = [r["step"] + 1 if log_x else r["step"] for r in probed]
        for ax, name in zip(axes.flat, names):
            ys = [r.get(name, float("nan")) for r in probed]
            ax.plot(xs, ys, style, color=f"C{setting % 10}", marker="o", ms=2, label=label)
    for ax, name in zip(axes.flat, names):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step + 1" if log_x else "step")
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if names:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return fig

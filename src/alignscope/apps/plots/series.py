"""Figures of scalars over training or across runs: metrics against step (with the loss), metrics against
checkpoint, regression scatter plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from alignscope.apps.correlation import Regression
from alignscope.apps.plots.base import _plt, note
from alignscope.apps.plots.coupling import NEGATIVE

LOSSES = ("train/loss", "val/loss")
"""The loss names the monitor records at each probe (the first panel of :func:`metrics_vs_step`)."""


def _grid(plt, count: int, width: float = 4.2, height: float = 3.0):
    cols = min(3, max(1, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)[:count]


def _value_note(ax, name: str, values: Sequence[float]) -> None:
    """A note on a panel whose values mean nothing: all NaN (coupling with one block) or a negative coupling."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        why = "needs two blocks" if name.startswith(("coupling", "alignment_across")) else "no finite value"
        note(ax, f"{name}: {why}", replace=True)
    elif name.startswith("coupling") and min(finite) < NEGATIVE:
        note(ax, "< 0: K is a large share of the width\n(unrelated bases give $m_K > 1$)")


def metrics_vs_step(
    history: Sequence[dict],
    names: Sequence[str],
    title: str | None = None,
    max_steps: int | None = None,
    losses: Sequence[dict] | None = None,
):
    """A loss panel (the :data:`LOSSES` found in ``losses``, entries ``{"step": N, loss: value}``; default
    ``history``), then one panel per scalar against the global step
    (entries of ``history`` are ``{"step": N, name: value}``); x from 0 to ``max_steps`` on every panel, so the
    figures of runs of the same length compare."""
    plt = _plt()
    names = [n for n in names if any(n in h for h in history)]
    points = history if losses is None else sorted(losses, key=lambda h: h["step"])
    found = [n for n in LOSSES if any(n in h for h in points)]
    fig, axes = _grid(plt, len(names) + 1)
    steps = [h["step"] for h in history]
    right = max_steps if max_steps and max_steps > 0 else max(steps, default=1)
    loss_ax, panels = axes[0], axes[1:]
    for name in found:
        pts = [(h["step"], h[name]) for h in points if name in h]
        loss_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    loss_ax.set_title("loss (train at each probe, val at each validation)", fontsize=9)
    if found:
        loss_ax.legend(fontsize=7)
    else:
        note(loss_ax, "no loss recorded", replace=True)
    for ax, name in zip(panels, names):
        values = [h.get(name, float("nan")) for h in history]
        ax.plot(steps, values, marker="o", ms=3)
        ax.set_title(name, fontsize=9)
        _value_note(ax, name, values)
    for ax in axes:
        ax.set_xlim(0, max(right, 1))
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def metrics_vs_checkpoint(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]):
    """One panel per metric, one line per label, against checkpoint step + 1 (log scale).

    ``series[metric][label]`` is the ``(step, value)`` points, sorted by step.
    """
    plt = _plt()
    fig, axes = _grid(plt, len(series))
    for ax, name in zip(axes, series):
        for label, pts in series[name].items():
            if pts:
                ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set(title=name, xlabel="checkpoint step + 1", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def regression_scatter(points: Sequence[Mapping[str, Any]], fit: Regression, label_key: str):
    """``fit.y_name`` against ``fit.x_name`` for ``points`` (each annotated with ``point[label_key]``), and the
    fitted line with its ``R^2`` and p-value when the slope is finite."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs, ys = [p[fit.x_name] for p in points], [p[fit.y_name] for p in points]
    ax.scatter(xs, ys, s=18)
    for p in points:
        ax.annotate(
            str(p[label_key]),
            (p[fit.x_name], p[fit.y_name]),
            fontsize=6,
            xytext=(3, 2),
            textcoords="offset points",
        )
    if math.isfinite(fit.slope):
        lo, hi = min(xs), max(xs)
        ax.plot(
            [lo, hi],
            [fit.slope * lo + fit.intercept, fit.slope * hi + fit.intercept],
            color="C1",
            label=f"$R^2$ = {fit.r2:.2f}, p = {fit.p_value:.2g}",
        )
        ax.legend(fontsize=8)
    ax.set(xlabel=fit.x_name, ylabel=fit.y_name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

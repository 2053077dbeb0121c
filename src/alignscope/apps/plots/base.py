"""Shared figure plumbing: the Agg backend, saving, notes in place of meaningless values, block ticks and
spread bands."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_TICKS = 12
"""At most this many labelled block ticks per axis (every block up to this count, then every n-th)."""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def save_all(builders: Mapping[str, Callable[[], Any]], folder: str | Path) -> dict[str, Path]:
    """Build and save each figure as ``folder/<name>.png``; a figure that fails is skipped with a warning
    (the run's numbers are already on disk, a figure never takes them down). Returns the written paths."""
    written = {}
    for name, builder in builders.items():
        try:
            written[name] = save(builder(), Path(folder) / f"{name}.png")
        except Exception as err:  # a figure is never worth losing a run for
            _plt().close("all")
            warnings.warn(f"figure {name!r} was not written: {type(err).__name__}: {err}", stacklevel=2)
    return written


def note(ax, text: str, *, replace: bool = False) -> None:
    """Write ``text`` on ``ax``: in its centre with the ticks hidden (``replace``: the panel has no values to
    show), else as a last line of the panel's title (set the title first), where it hides no data."""
    if replace:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    title = ax.get_title()
    ax.set_title(f"{title}\nnote: {text}" if title else f"note: {text}", fontsize=8)


def thinned(n: int, max_ticks: int = MAX_TICKS) -> list[int]:
    """Positions ``0..n-1`` to label: all of them up to ``max_ticks``, else every ``ceil(n / max_ticks)``-th
    and the last one."""
    every = max(1, math.ceil(n / max_ticks))
    keep = list(range(0, n, every))
    if keep and keep[-1] != n - 1:  # the last block is labelled; its neighbour tick goes if too close
        keep[-1 if n - 1 - keep[-1] < every / 2 else len(keep) :] = [n - 1]
    return keep


def block_ticks(ax, blocks: Sequence[int], axis: str = "both") -> None:
    """Label image rows/columns ``0..n-1`` with the 0-based block numbers ``blocks``, thinned to at most
    :data:`MAX_TICKS` per axis."""
    pos = thinned(len(blocks))
    labels = [str(blocks[p]) for p in pos]
    if axis in ("x", "both"):
        ax.set_xticks(pos, labels, fontsize=7)
    if axis in ("y", "both"):
        ax.set_yticks(pos, labels, fontsize=7)


def mean_and_spread(values) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the first axis (tokens/prompts), NaN ignored: ``[P, n] -> [n], [n]``
    (the spread is 0 for a single token)."""
    a = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        mean = np.nanmean(a, axis=0)
        std = np.nanstd(a, axis=0) if a.shape[0] > 1 else np.zeros_like(mean)
    return mean, std


def line_with_band(ax, x, values, label: str, **kwargs) -> Any:
    """Plot the mean of ``values`` (``[P, n]``) against ``x`` with a band of +- one standard deviation across
    the ``P`` tokens; returns the mean's line."""
    mean, std = mean_and_spread(values)
    (line,) = ax.plot(x, mean, marker="o", ms=3, label=label, **kwargs)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return line


def fit_line(ax, x, y, color: str, label: str) -> Any:
    """Draw the least-squares line of ``y`` against ``x`` over the finite points (dashed); None when fewer
    than two points are finite."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return None
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    xs = np.array([x[ok].min(), x[ok].max()])
    (line,) = ax.plot(xs, slope * xs + intercept, ls="--", color=color, lw=1.2, label=label)
    return line

"""Figures (matplotlib, Agg): coupling heat maps, metrics against step, PCA of token trajectories.

Each function returns a ``Figure``; :func:`save` writes it as PNG and closes it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alignscope.core import metrics
from alignscope.probing.result import ProbeResult


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


def coupling_heatmaps(results: dict[str, ProbeResult], k: int):
    """One heat map per labelled result of ``m_K(J_i, J_j)`` averaged over probed tokens (row i, column j)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        m = res.coupling[k].mean(0).numpy()
        im = ax.imshow(m, vmin=0.0, vmax=max(1.0, float(m.max())), cmap="viridis_r")
        ax.set_title(f"{label}: m_{k}, coupling {metrics.coupling_summary(res.coupling[k]).mean():.3f}")
        ax.set_xlabel("block j (bases)")
        ax.set_ylabel("block i")
        ticks = range(len(res.layers))
        ax.set_xticks(list(ticks), [str(layer) for layer in res.layers], fontsize=7)
        ax.set_yticks(list(ticks), [str(layer) for layer in res.layers], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def metrics_vs_step(history: Sequence[dict], names: Sequence[str]):
    """Line plots of scalars against ``step`` (entries of ``history`` are ``{"step": N, name: value}``)."""
    plt = _plt()
    names = [n for n in names if any(n in h for h in history)]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [h["step"] for h in history]
    log_x = len(steps) > 2 and max(steps) > 100
    for ax, name in zip(axes.flat, names):
        ax.plot(
            [s + 1 if log_x else s for s in steps],
            [h.get(name, float("nan")) for h in history],
            marker="o",
            ms=3,
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step + 1" if log_x else "step")
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def trajectory_pca(results: dict[str, ProbeResult]):
    """2-D PCA of each probed token's path ``x^0..x^L`` (one panel per labelled result, own PCA basis)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        states = res.hidden_states.double()
        finite = torch.isfinite(states).all(-1).all(-1)  # [P]: the whole path is finite
        if not bool(finite.all()):
            warnings.warn(
                f"trajectory PCA ({label}): {int((~finite).sum())} of {len(finite)} token paths have "
                "non-finite hidden states and are left out",
                stacklevel=2,
            )
        if not bool(finite.any()):
            ax.text(0.5, 0.5, "no finite trajectories\n(NaN/inf hidden states)", ha="center", va="center")
            ax.set_title(f"{label}: PCA not available", fontsize=9)
            ax.set_axis_off()
            continue
        coords, ratio = metrics.trajectory_pca(states[finite])
        depth = torch.arange(coords.shape[1])
        for path in coords:
            ax.plot(path[:, 0], path[:, 1], color="0.7", lw=0.8, zorder=1)
            sc = ax.scatter(path[:, 0], path[:, 1], c=depth, cmap="plasma", s=12, zorder=2)
        ax.set_title(f"{label}: PCA ({100 * float(ratio.sum()):.0f}% var.)", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        fig.colorbar(sc, ax=ax, fraction=0.046, label="depth l")
    fig.tight_layout()
    return fig

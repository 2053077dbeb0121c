"""Figures (matplotlib, Agg): coupling heat maps, metrics against step or checkpoint, PCA of token
trajectories, the ``|U_j^T J_i V_j|`` grid, spectra and step sizes against depth, regression scatter plots.

Each function returns a ``Figure``; :func:`save` writes it as PNG and closes it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alignscope.apps.correlation import Regression
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


def _legend_and_grid(fig, axes) -> None:
    """Legend and grid on every panel, then a tight layout."""
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()


def block_grid(result: ProbeResult, k: int) -> torch.Tensor:
    """Mean over tokens of ``|U_{j,K}^T J_i V_{j,K}|`` for the kept blocks: ``[n, n, K, K]``
    (``K`` capped at the width; ``result.extras["block_jacobians"]`` is ``[P, n, d, d]``)."""
    J = result.extras["block_jacobians"]
    k = min(k, J.shape[-1])
    grids = []
    for Jp in J:
        U, _, V = metrics.svd(Jp)
        grids.append(torch.einsum("jak,iab,jbl->ijkl", U[..., :k], Jp, V[..., :k]).abs())
    return torch.stack(grids).mean(0)


def block_grid_figure(result: ProbeResult, k: int, title: str):
    """``n x n`` panels of :func:`block_grid`, row ``i`` divided by ``s_1(J_i)`` (row: J of block i,
    column: bases of block j)."""
    plt = _plt()
    grid = block_grid(result, k)
    grid = (grid / grid.diagonal(dim1=0, dim2=1).amax(dim=(0, 1))[:, None, None, None]).numpy()
    n = grid.shape[0]
    blocks = result.meta.get("kept_blocks", list(range(n)))
    fig, axes = plt.subplots(n, n, figsize=(2.2 * n, 2.2 * n), squeeze=False)
    for i in range(n):
        for j in range(n):
            axes[i, j].imshow(grid[i, j], vmin=0, vmax=1.0, cmap="magma")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == n - 1:
                axes[i, j].set_xlabel(f"bases of block {blocks[j]}", fontsize=8)
            if j == 0:
                axes[i, j].set_ylabel(f"J of block {blocks[i]}", fontsize=8)
    fig.suptitle(f"{title}: |U_j^T J_i V_j| / s_1(J_i), top {grid.shape[-1]}")
    return fig


def spectra_vs_depth(results: dict[str, ProbeResult]):
    """Top singular values ``s_1``, ``s_5`` (log scale) and stable rank against block, per labelled result."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, res in results.items():
        depth = [layer + 1 for layer in res.layers]
        s = res.singular_values
        axes[0].plot(depth, s[..., 0].mean(0), marker="o", ms=3, label=f"{label} s_1")
        axes[0].plot(depth, s[..., 4].mean(0) if s.shape[-1] > 4 else [], ls="--", label=f"{label} s_5")
        axes[1].plot(depth, res.stable_rank.mean(0), marker="o", ms=3, label=label)
    axes[0].set(
        xlabel="block", ylabel="singular value (mean over tokens)", yscale="log", title="top singular values"
    )
    axes[1].set(xlabel="block", ylabel="stable rank", title="stable rank ||J||_F^2 / s_1^2")
    _legend_and_grid(fig, axes)
    return fig


def steps_and_norms(results: dict[str, ProbeResult]):
    """Mean ``log ||x^l - x^{l-1}||`` (step sizes, expodistance) and ``log ||x^l||`` against depth."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, res in results.items():
        h = res.hidden_states.double()
        steps = (h[:, 1:] - h[:, :-1]).norm(dim=-1).log().mean(0)
        norms = h.norm(dim=-1).log().mean(0)
        step_label = f"{label}: slope {res.step_slope.mean():.3f}, LSS {res.lss.mean():.2f}"
        axes[0].plot(range(1, len(steps) + 1), steps, marker="o", ms=3, label=step_label)
        norm_label = f"{label}: slope {res.norm_slope.mean():.3f}"
        axes[1].plot(range(len(norms)), norms, marker="o", ms=3, label=norm_label)
    axes[0].set(xlabel="block l", ylabel="log ||x^l - x^{l-1}||", title="step sizes (expodistance)")
    axes[1].set(xlabel="depth l", ylabel="log ||x^l||", title="norms")
    _legend_and_grid(fig, axes)
    return fig


def metrics_vs_checkpoint(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]):
    """One panel per metric, one line per label, against checkpoint step + 1 (log scale).

    ``series[metric][label]`` is the ``(step, value)`` points, sorted by step.
    """
    plt = _plt()
    names = list(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for label, pts in series[name].items():
            if pts:
                ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set(title=name, xlabel="checkpoint step + 1", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
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
            label=f"R^2 = {fit.r2:.2f}, p = {fit.p_value:.2g}",
        )
        ax.legend(fontsize=8)
    ax.set(xlabel=fit.x_name, ylabel=fit.y_name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

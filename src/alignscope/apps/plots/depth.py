"""Figures against depth: singular values, stable rank and the ``1 / s_1`` fit per block, step sizes and
norms of the residual stream with their exponential fits, and the PCA of token trajectories. Blocks are
0-based on every axis; a mean over tokens comes with a band of +- one standard deviation."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from alignscope.apps.plots.base import _plt, fit_line, line_with_band, mean_and_spread, note, thinned
from alignscope.core import metrics
from alignscope.probing.result import ProbeResult


def _legend_and_grid(axes) -> None:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def spectra_vs_depth(results: Mapping[str, ProbeResult], title: str | None = None):
    """Per block: top singular values ``s_1``, ``s_5`` (log scale), stable rank, and ``1 / s_1`` with its
    least-squares line (the fit of ``spectra/inv_s1_slope``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    axes[0].set(xlabel="block (0-based)", ylabel="singular value", yscale="log", title="top singular values")
    axes[1].set(xlabel="block (0-based)", ylabel="stable rank", title="stable rank $||J||_F^2 / s_1^2$")
    axes[2].set(xlabel="block (0-based)", ylabel="$1 / s_1$", title="$1 / s_1$ and its linear fit")
    for label, res in results.items():
        blocks = list(res.layers)
        s = res.singular_values.double().numpy()
        line_with_band(axes[0], blocks, s[..., 0], label=f"{label} $s_1$")
        if s.shape[-1] > 4:
            line_with_band(axes[0], blocks, s[..., 4], label=f"{label} $s_5$", ls="--")
        line_with_band(axes[1], blocks, res.stable_rank.double().numpy(), label=label)
        line = line_with_band(axes[2], blocks, 1.0 / s[..., 0], label=label)
        slope = float(res.inv_s1_slope.mean())
        r2 = float(res.inv_s1_r2.mean())
        fitted = fit_line(
            axes[2],
            blocks,
            mean_and_spread(1.0 / s[..., 0])[0],
            line.get_color(),
            f"fit: slope {slope:.3g}, $R^2$ {r2:.2f}",
        )
        if fitted is None:
            note(axes[2], "the 1/$s_1$ fit needs two blocks")
    _legend_and_grid(axes)
    heading = "spectra of the residual Jacobians (band: +- 1 std over tokens)"
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    return fig


def steps_and_norms(results: Mapping[str, ProbeResult], title: str | None = None):
    """``log ||x^l - x^{l-1}||`` (step of block ``l - 1``, 0-based; expodistance) and ``log ||x^l||`` (after
    block ``l - 1``; -1 is the first block's input) against block, each with its least-squares line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for label, res in results.items():
        h = res.hidden_states.double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            steps = (h[:, 1:] - h[:, :-1]).norm(dim=-1).log().numpy()
            norms = h.norm(dim=-1).log().numpy()
        x_steps, x_norms = np.arange(steps.shape[1]), np.arange(norms.shape[1]) - 1
        step_label = f"{label}: LSS {float(res.lss.mean()):.2f}"
        line = line_with_band(axes[0], x_steps, steps, label=step_label)
        fit = f"fit: slope {float(res.step_slope.mean()):.3f}, $R^2$ {float(res.step_r2.mean()):.2f}"
        fit_line(axes[0], x_steps, mean_and_spread(steps)[0], line.get_color(), fit)
        line = line_with_band(axes[1], x_norms, norms, label=label)
        fit = f"fit: slope {float(res.norm_slope.mean()):.3f}, $R^2$ {float(res.norm_r2.mean()):.2f}"
        fit_line(axes[1], x_norms, mean_and_spread(norms)[0], line.get_color(), fit)
    axes[0].set(xlabel="block (0-based)", ylabel="log $||x^l - x^{l-1}||$", title="step sizes (expodistance)")
    axes[1].set(xlabel="after block (0-based; -1 = input)", ylabel="log $||x^l||$", title="norms")
    _legend_and_grid(axes)
    heading = "residual stream against depth (band: +- 1 std over tokens)"
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    return fig


def trajectory_pca(results: Mapping[str, ProbeResult], title: str | None = None):
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
        depth = torch.arange(coords.shape[1]) - 1
        for path in coords:
            ax.plot(path[:, 0], path[:, 1], color="0.7", lw=0.8, zorder=1)
            sc = ax.scatter(path[:, 0], path[:, 1], c=depth, cmap="plasma", s=12, zorder=2)
        ax.set_title(f"{label}: PCA ({100 * float(ratio.sum()):.0f}% var.)", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ticks = [int(depth[p]) for p in thinned(len(depth))]
        fig.colorbar(sc, ax=ax, fraction=0.046, ticks=ticks, label="after block (0-based; -1 = input)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

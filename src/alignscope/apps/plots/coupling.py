"""Coupling figures: heat maps of the coupling similarity ``1 - m_K^2`` between blocks, its profile against
block distance ``|i - j|``, and that profile over training."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from alignscope.apps.plots.base import _plt, block_ticks, line_with_band, mean_and_spread, note, thinned
from alignscope.probing.result import ProbeResult

NEEDS_TWO = "coupling needs two blocks\n(one block probed)"
NEGATIVE = -0.05
"""A plotted coupling below this gets a note (values just below 0 are the spread of unrelated bases)."""


def similarity_label(k: int) -> str:
    """Axis/colorbar text naming the plotted quantity (mathtext)."""
    return f"coupling $1 - m_{{{k}}}^2$ (higher = more coupled)"


def coupling_similarity(result: ProbeResult, k: int) -> np.ndarray:
    """Per-token coupling similarity ``1 - m_K(J_i, J_j)^2`` with the diagonal set to NaN: ``[P, n, n]``."""
    sim = 1.0 - result.coupling[k].double().numpy() ** 2
    n = sim.shape[-1]
    sim[:, np.arange(n), np.arange(n)] = np.nan
    return sim


def distance_profile(result: ProbeResult, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Coupling against block distance: the distances ``D`` present among the probed blocks (``|b_i - b_j|``
    in block numbers, > 0) and, per token, the mean of ``1 - m_K^2`` over the ordered pairs at each distance:
    ``([D], [P, D])``."""
    sim = coupling_similarity(result, k)
    blocks = np.asarray(result.layers)
    dist = np.abs(blocks[:, None] - blocks[None, :])
    distances = np.unique(dist[dist > 0])
    per_token = np.stack([sim[:, dist == d].mean(-1) for d in distances], -1) if len(distances) else None
    return distances, per_token if per_token is not None else np.zeros((sim.shape[0], 0))


def negative_note(results: Mapping[str, ProbeResult], k: int) -> str | None:
    """The note for a figure whose coupling goes below 0 (``m_K > 1``: K a large share of the width)."""
    for res in results.values():
        mean = mean_and_spread(coupling_similarity(res, k))[0]
        if res.coupling[k].shape[-1] > 1 and bool(np.nanmin(mean) < NEGATIVE):
            d = res.hidden_states.shape[-1]
            return (
                f"values < 0: K = {min(k, d)} is a large share of the width d = {d}, where unrelated bases "
                "give $m_K > 1$;\ncompare them only with each other"
            )
    return None


def _shared_limits(maps: list[np.ndarray]) -> tuple[float, float]:
    """One colour range for every panel: the finite off-diagonal values' range (0..1 when there are none)."""
    finite = np.concatenate([m[np.isfinite(m)] for m in maps]) if maps else np.array([])
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.05, hi + 0.05) if hi - lo < 1e-9 else (lo, hi)


def _distance_axis(ax, results: Mapping[str, ProbeResult], k: int) -> None:
    """Labels, integer distance ticks (thinned), grid, and the note for negative values."""
    distances = sorted({int(d) for res in results.values() for d in distance_profile(res, k)[0]})
    ax.set_xticks([distances[p] for p in thinned(len(distances))])
    ax.set_xlim(distances[0] - 0.5, distances[-1] + 0.5)
    ax.set(xlabel="block distance |i - j|", ylabel=similarity_label(k))
    ax.grid(alpha=0.3)
    warning = negative_note(results, k)
    if warning:
        note(ax, warning)


def coupling_heatmaps(results: Mapping[str, ProbeResult], k: int, title: str | None = None):
    """One heat map per labelled result of ``1 - m_K(J_i, J_j)^2`` averaged over tokens (row i, column j),
    the diagonal masked, one colour scale and one labelled colorbar for all panels; ``title`` above them."""
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.0 * len(results) + 1.2, 3.9), squeeze=False, layout="constrained"
    )
    maps = {label: mean_and_spread(coupling_similarity(res, k))[0] for label, res in results.items()}
    vmin, vmax = _shared_limits([m for m in maps.values() if m.shape[-1] > 1])
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = None
    for ax, (label, res) in zip(axes[0], results.items()):
        if len(res.layers) < 2:
            ax.set_title(f"{label}", fontsize=9)
            note(ax, NEEDS_TWO, replace=True)
            continue
        image = ax.imshow(np.ma.masked_invalid(maps[label]), vmin=vmin, vmax=vmax, cmap=cmap)
        summary = float(np.nanmean(maps[label]))
        ax.set_title(f"{label}: mean coupling {summary:.3f}", fontsize=9)
        ax.set_xlabel("block j (bases)")
        ax.set_ylabel("block i")
        block_ticks(ax, res.layers)
    if image is not None:
        fig.colorbar(
            image, ax=list(axes[0]), label=similarity_label(k) + "\nmean over tokens, diagonal masked"
        )
    warning = negative_note(results, k)
    heading = title or f"block coupling at K = {k}"
    fig.suptitle(f"{heading}\nnote: {warning}" if warning else heading, fontsize=10 if not warning else 9)
    return fig


def coupling_vs_distance(results: Mapping[str, ProbeResult], k: int, title: str | None = None):
    """Mean of ``1 - m_K^2`` over block pairs at each distance ``|i - j|``, one line per labelled result,
    with a band of +- one standard deviation across tokens (prompts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    drawn = 0
    for label, res in results.items():
        distances, per_token = distance_profile(res, k)
        if len(distances):
            line_with_band(ax, distances, per_token, label=label)
            drawn += 1
    ax.set_title(title or f"coupling against block distance, K = {k}", fontsize=9)
    if not drawn:
        note(ax, NEEDS_TWO, replace=True)
        return fig
    _distance_axis(ax, results, k)
    ax.legend(fontsize=7, title="band: +- 1 std over tokens", title_fontsize=7)
    return fig


def coupling_profile_over_training(probes: Mapping[int, ProbeResult], k: int, title: str | None = None):
    """The distance profile of :func:`coupling_vs_distance` at every probed step (one line per step, coloured
    by step, with a colorbar; faint bands: +- one standard deviation across tokens)."""
    import matplotlib as mpl

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.9), layout="constrained")
    steps = sorted(probes)
    norm = mpl.colors.Normalize(vmin=min(steps, default=0), vmax=max(max(steps, default=1), 1))
    cmap = plt.get_cmap("viridis")
    drawn = 0
    for step in steps:
        distances, per_token = distance_profile(probes[step], k)
        if not len(distances):
            continue
        mean, std = mean_and_spread(per_token)
        color = cmap(norm(step))
        ax.plot(distances, mean, marker="o", ms=3, color=color, lw=1.2)
        ax.fill_between(distances, mean - std, mean + std, color=color, alpha=0.08, lw=0)
        drawn += 1
    ax.set_title(title or f"coupling against block distance over training, K = {k}", fontsize=9)
    if not drawn:
        note(ax, NEEDS_TWO, replace=True)
        return fig
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
    _distance_axis(ax, {str(s): probes[s] for s in steps}, k)
    return fig

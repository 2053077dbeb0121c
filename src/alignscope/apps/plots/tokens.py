"""The token-by-token coupling grid: ``1 - m_K(J^l_t, J^l_{t'})^2`` across one prompt's probed tokens, for a
few blocks (the paper's token grid)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alignscope.apps.plots.base import _plt, thinned
from alignscope.apps.plots.coupling import _shared_limits, similarity_label
from alignscope.probing.result import ProbeResult


def grid_blocks(layers: Sequence[int]) -> list[int]:
    """Indices into ``layers`` of the panels: the first, middle and last probed block (fewer if fewer)."""
    n = len(layers)
    return sorted({0, n // 2, n - 1})


def token_similarity(result: ProbeResult, k: int, prompt: int = 0) -> tuple[np.ndarray, list[int]]:
    """``1 - m_K^2`` across prompt ``prompt``'s probed tokens per block, diagonal NaN: ``([L', T, T],
    positions)`` (padding removed)."""
    positions = [int(t) for t in result.extras["token_coupling_positions"][prompt] if t >= 0]
    m = result.token_coupling[k][prompt, :, : len(positions), : len(positions)].double().numpy()
    sim = 1.0 - m**2
    idx = np.arange(len(positions))
    sim[:, idx, idx] = np.nan
    return sim, positions


def token_coupling_grid(
    result: ProbeResult,
    k: int,
    title: str | None = None,
    prompt: int = 0,
    labels: Sequence[str] | None = None,
):
    """Heat maps of ``1 - m_K(J^l_t, J^l_{t'})^2`` (row ``t``, column ``t'``: the bases) for the first,
    middle and last probed block of prompt ``prompt``, the diagonal masked, one colour scale and one labelled
    colorbar; ticks are token positions, or ``labels`` (one text per probed token)."""
    plt = _plt()
    sim, positions = token_similarity(result, k, prompt)
    panels = grid_blocks(result.layers)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.8 * len(panels) + 1.2, 3.9), squeeze=False, layout="constrained"
    )
    vmin, vmax = _shared_limits([sim[i] for i in panels])
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    names = list(labels) if labels is not None else [str(t) for t in positions]
    ticks = thinned(len(positions))
    image = None
    for ax, i in zip(axes[0], panels):
        image = ax.imshow(np.ma.masked_invalid(sim[i]), vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_title(f"block {result.layers[i]}: mean {float(np.nanmean(sim[i])):.3f}", fontsize=9)
        ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90 if labels is not None else 0, fontsize=7)
        ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=7)
        ax.set_xlabel("token t' (bases)")
        ax.set_ylabel("token t")
    fig.colorbar(image, ax=list(axes[0]), label=similarity_label(k) + "\nacross tokens, diagonal masked")
    fig.suptitle(title or f"coupling across tokens at K = {k}, prompt {prompt}", fontsize=10)
    return fig

"""The ``|U_j^T J_i V_j|`` grid of the kept blocks (``ProbeResult.extras["block_jacobians"]``)."""

from __future__ import annotations

import torch

from alignscope.apps.plots.base import _plt, thinned
from alignscope.core import factorization
from alignscope.probing.result import ProbeResult


def block_grid(result: ProbeResult, k: int) -> torch.Tensor:
    """Mean over tokens of ``|U_{j,K}^T J_i V_{j,K}|`` for the kept blocks: ``[n, n, K, K]``
    (``K`` capped at the width; ``result.extras["block_jacobians"]`` is ``[P, n, d, d]``)."""
    J = result.extras["block_jacobians"]
    k = min(k, J.shape[-1])
    grids = []
    for Jp in J:
        U, _, V = factorization.svd(Jp)
        grids.append(torch.einsum("jak,iab,jbl->ijkl", U[..., :k], Jp, V[..., :k]).abs())
    return torch.stack(grids).mean(0)


def block_grid_figure(result: ProbeResult, k: int, title: str):
    """``n x n`` panels of :func:`block_grid`, row ``i`` divided by ``s_1(J_i)`` (row: J of block i, column:
    bases of block j), one colorbar, singular-vector ticks on the outer panels."""
    import matplotlib as mpl

    plt = _plt()
    grid = block_grid(result, k)
    grid = (grid / grid.diagonal(dim1=0, dim2=1).amax(dim=(0, 1))[:, None, None, None]).numpy()
    n, kk = grid.shape[0], grid.shape[-1]
    blocks = result.meta.get("kept_blocks", list(range(n)))
    fig, axes = plt.subplots(n, n, figsize=(2.2 * n + 1.0, 2.2 * n), squeeze=False, layout="constrained")
    pos = thinned(kk, max_ticks=6)
    norm = mpl.colors.PowerNorm(0.5, vmin=0.0, vmax=1.0)  # small off-diagonal entries stay visible
    image = None
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            image = ax.imshow(grid[i, j], norm=norm, cmap="magma")
            ax.set_xticks(pos, [str(p + 1) for p in pos] if i == n - 1 else [], fontsize=6)
            ax.set_yticks(pos, [str(p + 1) for p in pos] if j == 0 else [], fontsize=6)
            if i == n - 1:
                ax.set_xlabel(f"bases of block {blocks[j]}\n(right sing. vector, 1 = top)", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"J of block {blocks[i]}\n(left sing. vector)", fontsize=7)
    fig.colorbar(
        image,
        ax=axes.ravel().tolist(),
        label="$|U_j^T J_i V_j|$ / $s_1(J_i)$, mean over tokens (square-root scale)",
    )
    fig.suptitle(f"{title}: $|U_j^T J_i V_j|$ / $s_1(J_i)$, top {kk}, blocks {list(blocks)}", fontsize=10)
    return fig

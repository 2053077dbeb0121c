"""Figures (matplotlib, Agg): coupling heat maps and profiles against block distance, metrics against step or
checkpoint, PCA of token trajectories, the ``|U_j^T J_i V_j|`` grid, spectra and step sizes against depth,
regression scatter plots, the token-by-token coupling grid.

Each function returns a ``Figure``; :func:`save` writes it as PNG and closes it.
"""

from alignscope.apps.plots.base import _plt, note, save, save_all, thinned
from alignscope.apps.plots.coupling import (
    coupling_heatmaps,
    coupling_profile_over_training,
    coupling_similarity,
    coupling_vs_distance,
    distance_profile,
)
from alignscope.apps.plots.depth import spectra_vs_depth, steps_and_norms, trajectory_pca
from alignscope.apps.plots.grid import block_grid, block_grid_figure
from alignscope.apps.plots.series import LOSSES, metrics_vs_checkpoint, metrics_vs_step, regression_scatter
from alignscope.apps.plots.tokens import token_coupling_grid

__all__ = [
    "LOSSES",
    "_plt",
    "block_grid",
    "block_grid_figure",
    "coupling_heatmaps",
    "coupling_profile_over_training",
    "coupling_similarity",
    "coupling_vs_distance",
    "distance_profile",
    "metrics_vs_checkpoint",
    "metrics_vs_step",
    "note",
    "regression_scatter",
    "save",
    "save_all",
    "spectra_vs_depth",
    "steps_and_norms",
    "thinned",
    "token_coupling_grid",
    "trajectory_pca",
]

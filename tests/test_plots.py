"""Figure functions of the apps: the data they draw is the data they are given."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignscope.apps import plots
from alignscope.apps.correlation import Regression
from alignscope.core import metrics


def test_block_grid_diagonal_holds_each_blocks_singular_values():
    J = torch.randn(3, 2, 6, 6, dtype=torch.float64)  # [P, n, d, d]
    grid = plots.block_grid(SimpleNamespace(extras={"block_jacobians": J}), k=4)
    assert grid.shape == (2, 2, 4, 4)
    for i in range(2):
        s = torch.stack([metrics.svd(J[p, i])[1][:4] for p in range(3)]).mean(0)
        torch.testing.assert_close(grid[i, i], torch.diag(s))  # U_i^T J_i V_i = diag(s)
    assert plots.block_grid(SimpleNamespace(extras={"block_jacobians": J}), k=50).shape[-1] == 6


def test_metrics_vs_checkpoint_draws_the_given_points():
    series = {"a": {"pretrained": [(0, 1.0), (99, 2.0)], "random": []}, "b": {"pretrained": [(9, 3.0)]}}
    fig = plots.metrics_vs_checkpoint(series)
    axes = fig.axes
    assert [ax.get_title() for ax in axes[:2]] == ["a", "b"]
    (line,) = axes[0].get_lines()  # the empty random series draws nothing
    assert list(line.get_xdata()) == [1, 100] and list(line.get_ydata()) == [1.0, 2.0]
    plots._plt().close(fig)


@pytest.mark.parametrize("slope", [2.0, math.nan])
def test_regression_scatter_draws_points_labels_and_the_fit(slope):
    points = [{"x": 1.0, "y": 3.0, "m": "a"}, {"x": 4.0, "y": 9.0, "m": "b"}]
    fig = plots.regression_scatter(points, Regression("x", "y", 2, slope, 1.0, 1.0, 0.0), "m")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["a", "b"]
    lines = ax.get_lines()
    if math.isnan(slope):
        assert lines == []
    else:
        assert list(lines[0].get_xdata()) == [1.0, 4.0] and list(lines[0].get_ydata()) == [3.0, 9.0]
    plots._plt().close(fig)

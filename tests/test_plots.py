"""Figure functions of the apps: the data they draw is the data they are given."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignscope.apps import plots
from alignscope.apps.correlation import Regression
from alignscope.core import factorization


def test_block_grid_diagonal_holds_each_blocks_singular_values():
    J = torch.randn(3, 2, 6, 6, dtype=torch.float64)  # [P, n, d, d]
    grid = plots.block_grid(SimpleNamespace(extras={"block_jacobians": J}), k=4)
    assert grid.shape == (2, 2, 4, 4)
    for i in range(2):
        s = torch.stack([factorization.svd(J[p, i])[1][:4] for p in range(3)]).mean(0)
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


# ------------------------------------------------------------------ coupling figures
def _result(m: torch.Tensor, layers=None, width: int = 16, blocks: int | None = None) -> SimpleNamespace:
    """A hand-built stand-in for a ProbeResult with coupling ``m`` (``[P, n, n]``) at K = 10."""
    n = m.shape[-1]
    layers = list(range(n)) if layers is None else layers
    return SimpleNamespace(
        coupling={10: m}, layers=layers, hidden_states=torch.zeros(m.shape[0], (blocks or n) + 1, width)
    )


def _m(n: int, value: float, tokens: int = 2) -> torch.Tensor:
    m = torch.full((tokens, n, n), value)
    m[:, torch.arange(n), torch.arange(n)] = 0.0
    return m


def test_coupling_heatmaps_show_1_minus_m2_on_one_masked_scale_with_a_labelled_colorbar():
    results = {"init": _result(_m(3, 0.9)), "final": _result(_m(3, 0.5))}
    fig = plots.coupling_heatmaps(results, 10, "tiny_gpt2, random init, step 12")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2
    (clim,) = {im.get_clim() for im in images}  # one shared scale: the off-diagonal range
    torch.testing.assert_close(clim, (1 - 0.9**2, 1 - 0.5**2), atol=1e-6, rtol=0)
    for im in images:
        data = im.get_array()
        assert data.mask[range(3), range(3)].all() and not data.mask[0, 1]  # diagonal masked
    torch.testing.assert_close(float(images[1].get_array()[0, 1]), 0.75)  # 1 - m^2, not m
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "1 - m_{10}^2" in colorbars[0].get_ylabel()
    assert fig._suptitle.get_text() == "tiny_gpt2, random init, step 12"
    plots._plt().close(fig)


def test_coupling_heatmap_ticks_are_thinned_block_numbers():
    fig = plots.coupling_heatmaps({"x": _result(_m(30, 0.8, tokens=1))}, 10)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 2 <= len(labels) <= 12 and labels[0] == "0" and labels[-1] == "29"
    plots._plt().close(fig)
    assert plots.thinned(5) == [0, 1, 2, 3, 4]


def test_coupling_figures_say_one_block_needs_two_and_note_negative_values():
    fig = plots.coupling_heatmaps({"one": _result(torch.zeros(2, 1, 1))}, 10)
    assert any("needs two blocks" in t.get_text() for t in fig.axes[0].texts)
    assert fig.axes[0].get_images() == []
    plots._plt().close(fig)
    fig = plots.coupling_vs_distance({"one": _result(torch.zeros(2, 1, 1))}, 10)
    assert any("needs two blocks" in t.get_text() for t in fig.axes[0].texts)
    plots._plt().close(fig)
    fig = plots.coupling_heatmaps({"big K": _result(_m(3, 1.2))}, 10)  # m > 1: 1 - m^2 < 0
    assert "large share of the width d = 16" in fig._suptitle.get_text()
    plots._plt().close(fig)


def test_distance_profile_is_the_mean_of_1_minus_m2_over_pairs_at_each_distance():
    m = torch.tensor([[[0.0, 0.1, 0.2], [0.3, 0.0, 0.4], [0.5, 0.6, 0.0]], [[0.0] * 3] * 3])
    distances, per_token = plots.distance_profile(_result(m, layers=[1, 2, 3]), 10)
    assert list(distances) == [1, 2]
    d1 = (4 - (0.1**2 + 0.3**2 + 0.4**2 + 0.6**2)) / 4  # pairs (1,2), (2,1), (2,3), (3,2)
    d2 = (2 - (0.2**2 + 0.5**2)) / 2
    torch.testing.assert_close(
        torch.tensor(per_token), torch.tensor([[d1, d2], [1.0, 1.0]], dtype=torch.float64)
    )
    fig = plots.coupling_vs_distance({"a": _result(m, layers=[1, 2, 3])}, 10)
    (line,) = fig.axes[0].get_lines()
    torch.testing.assert_close(
        torch.tensor(line.get_ydata()), torch.tensor([(d1 + 1) / 2, (d2 + 1) / 2]).double()
    )
    assert len(fig.axes[0].collections) == 1  # the spread band across tokens
    plots._plt().close(fig)


def test_coupling_profile_over_training_draws_one_line_per_step_with_a_step_colorbar():
    probes = {0: _result(_m(4, 0.9)), 5: _result(_m(4, 0.6)), 10: _result(_m(4, 0.3))}
    fig = plots.coupling_profile_over_training(probes, 10, "run-s0")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3 and lines[0].get_color() != lines[-1].get_color()
    torch.testing.assert_close(float(lines[-1].get_ydata()[0]), 1 - 0.3**2)
    assert fig.axes[1].get_ylabel() == "training step"
    plots._plt().close(fig)


# ------------------------------------------------------------------ depth figures
def _depth_result() -> SimpleNamespace:
    h = torch.zeros(2, 4, 3, dtype=torch.float64)
    for p in range(2):
        for l in range(1, 4):  # steps of size e^l: log step size 1, 2, 3
            h[p, l] = h[p, l - 1] + torch.tensor([math.exp(l), 0, 0])
    s = torch.tensor([[[2.0, 1.0]] * 3, [[4.0, 1.0]] * 3])  # [P, L', K]
    ones = torch.ones(2)
    return SimpleNamespace(
        layers=[0, 1, 2], hidden_states=h, singular_values=s, stable_rank=torch.ones(2, 3),
        lss=ones, step_slope=ones, step_r2=ones, norm_slope=ones, norm_r2=ones,
        inv_s1_slope=torch.zeros(2), inv_s1_r2=torch.zeros(2),
    )  # fmt: skip


def test_steps_and_norms_draw_the_fitted_lines_against_0_based_blocks():
    fig = plots.steps_and_norms({"a": _depth_result()})
    steps_ax = fig.axes[0]
    mean, fit = steps_ax.get_lines()
    assert list(mean.get_xdata()) == [0, 1, 2] and fit.get_linestyle() == "--"
    torch.testing.assert_close(torch.tensor(fit.get_ydata()), torch.tensor([1.0, 3.0]).double())
    assert "block (0-based)" in steps_ax.get_xlabel() and "slope" in fit.get_label()
    plots._plt().close(fig)


def test_spectra_draw_1_over_s1_with_its_fit_and_bands():
    fig = plots.spectra_vs_depth({"a": _depth_result()})
    inv_ax = fig.axes[2]
    mean, fit = inv_ax.get_lines()
    torch.testing.assert_close(torch.tensor(mean.get_ydata()), torch.full((3,), 0.375).double())
    assert fit.get_linestyle() == "--" and len(inv_ax.collections) == 1
    assert all(
        "$" not in t.get_text() or t.get_text().count("$") % 2 == 0
        for t in fig.findobj(lambda a: hasattr(a, "get_text"))
    )
    plots._plt().close(fig)


def test_block_grid_figure_has_a_colorbar_and_ticks():
    J = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    res = SimpleNamespace(extras={"block_jacobians": J}, meta={"kept_blocks": [4, 5, 6]})
    fig = plots.block_grid_figure(res, 4, "m")
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "U_j^T J_i V_j" in colorbars[0].get_ylabel()
    corner = fig.axes[6]  # bottom-left panel: both tick labels
    assert corner.get_xticklabels()[0].get_text() == "1" and corner.get_yticklabels()
    assert "block 6" in corner.get_ylabel() and "block 4" in corner.get_xlabel()
    plots._plt().close(fig)


# ------------------------------------------------------------------ series
def test_metrics_vs_step_has_a_loss_panel_the_run_name_and_a_0_to_max_steps_axis():
    history = [
        {"step": 0, "coupling/k10": 0.1},
        {"step": 5, "coupling/k10": 0.4, "train/loss": 3.0},
        {"step": 10, "coupling/k10": 0.5, "train/loss": 2.5, "val/loss": 2.7},
    ]
    fig = plots.metrics_vs_step(history, ["coupling/k10", "lss/mean"], "tiny_gpt2-s0", max_steps=100)
    loss_ax, coupling_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train/loss", "val/loss"]
    assert list(loss_ax.get_lines()[0].get_ydata()) == [3.0, 2.5]
    assert coupling_ax.get_title() == "coupling/k10" and coupling_ax.get_xlim() == (0, 100)
    assert fig._suptitle.get_text() == "tiny_gpt2-s0"
    plots._plt().close(fig)


def test_metrics_vs_step_notes_a_coupling_that_needs_two_blocks():
    fig = plots.metrics_vs_step([{"step": 0, "coupling/k10": math.nan}], ["coupling/k10"])
    assert any("needs two blocks" in t.get_text() for t in fig.axes[1].texts)
    assert any("no loss recorded" in t.get_text() for t in fig.axes[0].texts)
    plots._plt().close(fig)


def test_recorded_losses_take_the_losses_from_the_trainers_metrics():
    from alignscope.apps.monitor_figures import recorded_losses

    metrics_now = {"train/loss": torch.tensor(2.5), "align/coupling/k10": torch.tensor(0.3)}
    assert recorded_losses(metrics_now) == {"train/loss": 2.5}


def test_probe_app_keeps_three_adjacent_blocks_by_default():
    from omegaconf import OmegaConf

    from alignscope.apps.probe_app import report_blocks
    from alignscope.probing.settings import ProbeSettings

    cfg = OmegaConf.create({"report_blocks": None})
    assert report_blocks(cfg, ProbeSettings(), 30) == [14, 15, 16]
    assert report_blocks(cfg, ProbeSettings(), 2) == [0, 1]


def test_thinned_ticks_keep_the_last_position_and_spacing():
    assert plots.thinned(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert plots.thinned(10, max_ticks=6) == [0, 2, 4, 6, 8, 9]
    assert plots.thinned(13) == [0, 2, 4, 6, 8, 10, 12]


def test_trajectory_pca_colours_points_by_0_based_block_with_integer_ticks():
    res = _depth_result()
    res.hidden_states = torch.randn(2, 4, 3, dtype=torch.float64)
    fig = plots.trajectory_pca({"a": res}, "run: trajectories")
    colorbar = fig.axes[1]
    assert [t.get_text() for t in colorbar.get_yticklabels()] == ["\N{MINUS SIGN}1", "0", "1", "2"]
    assert fig._suptitle.get_text() == "run: trajectories"
    plots._plt().close(fig)


def test_a_coupling_just_below_zero_gets_no_note():
    fig = plots.coupling_heatmaps({"init": _result(_m(3, 1.01))}, 10)  # 1 - m^2 = -0.02: spread, not K vs d
    assert "note" not in fig._suptitle.get_text()
    plots._plt().close(fig)

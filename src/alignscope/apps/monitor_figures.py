"""The monitor's end-of-fit figures: coupling heat maps and trajectory PCA at the first and latest probe,
coupling against block distance at every probe, and the loss and every headline metric against step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from alignscope.apps.plots.series import LOSSES
from alignscope.apps.resumed_probes import probe_folder
from alignscope.probing.result import HEADLINE, ProbeResult


def load_probe(run_dir: Path, step: int) -> ProbeResult | None:
    """The saved probe of ``step`` in a monitor's run folder, None when its folder is not there."""
    folder = probe_folder(run_dir, step)
    return ProbeResult.load(folder) if folder.is_dir() else None


def load_probes(run_dir: Path, steps: Sequence[int]) -> dict[int, ProbeResult]:
    """The saved probes of ``steps`` by step (steps without a folder left out)."""
    loaded = {step: load_probe(run_dir, step) for step in steps}
    return {step: res for step, res in loaded.items() if res is not None}


def recorded_losses(metrics: Mapping[str, Any], names: Sequence[str] = LOSSES) -> dict[str, float]:
    """The losses ``names`` (default :data:`~alignscope.apps.plots.series.LOSSES`) among a trainer's
    ``callback_metrics``."""
    return {name: float(metrics[name]) for name in names if metrics.get(name) is not None}


def write_monitor_figures(
    history: Sequence[dict[str, float]],
    ks: Sequence[int],
    first: ProbeResult | None,
    latest: ProbeResult | None,
    folder: Path,
    probes: Mapping[int, ProbeResult] | None = None,
    run_name: str | None = None,
    max_steps: int | None = None,
    val_losses: Sequence[dict[str, float]] = (),
) -> dict[str, Path]:
    """Write the figures to ``folder``: ``coupling_k<K>`` and ``trajectories_pca`` (need both probes),
    ``coupling_distance_k<K>`` (the profile against ``|i - j|`` at every step of ``probes``),
    ``metrics_vs_step`` (x from 0 to ``max_steps``; the loss panel: the train loss at each probe and
    ``val_losses``, ``{"step": N, "val/loss": v}`` at each validation); titled with ``run_name``. A figure that fails is
    skipped with a warning. Returns the written paths by name."""
    from alignscope.apps import plots

    name = run_name or "run"
    builders: dict[str, Any] = {}
    if first is not None and latest is not None:
        pair = {
            f"init (step {first.meta.get('step', 0)})": first,
            f"step {latest.meta.get('step', '?')}": latest,
        }
        for k in ks:
            title = f"{name}: block coupling at K = {k}, init and step {latest.meta.get('step', '?')}"
            builders[f"coupling_k{k}"] = partial(plots.coupling_heatmaps, pair, k, title)
        builders["trajectories_pca"] = partial(plots.trajectory_pca, pair, f"{name}: token trajectories")
    for k in ks if probes else []:
        title = f"{name}: coupling against block distance over training, K = {k}"
        builders[f"coupling_distance_k{k}"] = partial(plots.coupling_profile_over_training, probes, k, title)
    names = [n for n in HEADLINE if n.split("/")[0] != "coupling" or n.endswith(tuple(f"k{k}" for k in ks))]
    probed = [h for h in history if len(h) > 1]
    losses = [h for h in probed if "train/loss" in h] + list(val_losses)
    builders["metrics_vs_step"] = partial(
        plots.metrics_vs_step, probed, names, name, max_steps, losses=losses
    )
    return plots.save_all(builders, folder)

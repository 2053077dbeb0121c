"""The monitor's end-of-fit figures: coupling and trajectory PCA at the first and latest probe, and every
headline metric against step."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from alignscope.apps.resumed_probes import probe_folder
from alignscope.probing.result import HEADLINE, ProbeResult


def load_probe(run_dir: Path, step: int) -> ProbeResult | None:
    """The saved probe of ``step`` in a monitor's run folder, None when its folder is not there."""
    folder = probe_folder(run_dir, step)
    return ProbeResult.load(folder) if folder.is_dir() else None


def write_monitor_figures(
    history: Sequence[dict[str, float]],
    ks: Sequence[int],
    first: ProbeResult | None,
    latest: ProbeResult | None,
    folder: Path,
) -> dict[str, Path]:
    """Write the figures to ``folder`` (``coupling_k<K>``, ``trajectories_pca``, ``metrics_vs_step``; the first
    two need both probes); a figure that fails is skipped with a warning. Returns the written paths by name."""
    from alignscope.apps import plots

    builders: dict[str, Any] = {}
    if first is not None and latest is not None:
        pair = {
            f"step {first.meta.get('step', 0)}": first,
            f"step {latest.meta.get('step', '?')}": latest,
        }
        for k in ks:
            builders[f"coupling_k{k}"] = partial(plots.coupling_heatmaps, pair, k)
        builders["trajectories_pca"] = partial(plots.trajectory_pca, pair)
    names = [n for n in HEADLINE if n.split("/")[0] != "coupling" or n.endswith(tuple(f"k{k}" for k in ks))]
    probed = [h for h in history if len(h) > 1]
    builders["metrics_vs_step"] = partial(plots.metrics_vs_step, probed, names)
    return plots.save_all(builders, folder)

"""What the monitor and the probe app send to W&B beyond plain scalars: per-block scalars in sections of their
own, figures at every probe, the summary, and result folders as artifacts (other loggers get none of it)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from alignscope.probing.result import ProbeResult

BLOCK_KEY = re.compile(r"^(?P<prefix>[^/]*/)?(?P<metric>.+)/(?P<block>block_\d+)$")
"""A per-block scalar's name, e.g. ``align/coupling/k10/block_03``."""


def is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def wandb_key(key: str) -> str:
    """The W&B history key of a logged scalar: a per-block one goes to a section per metric,
    ``align/coupling/k10/block_03`` -> ``align_blocks.coupling.k10/block_03`` (W&B builds a section per
    prefix; one ``align`` section would hold every block of every metric)."""
    match = BLOCK_KEY.match(key)
    if match is None:
        return key
    prefix = (match["prefix"] or "").rstrip("/")
    metric = match["metric"].replace("/", ".")
    return f"{prefix}_blocks.{metric}/{match['block']}" if prefix else f"blocks.{metric}/{match['block']}"


def log_metrics(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """``metrics`` to every logger at ``step``; W&B gets the names of :func:`wandb_key`."""
    for logger in loggers:
        if is_wandb(logger):
            logger.log_metrics({wandb_key(k): v for k, v in metrics.items()}, step=step)
        else:
            logger.log_metrics(dict(metrics), step=step)


def log_images(loggers: Iterable[Any], paths: Mapping[str, Path], prefix: str, step: int) -> None:
    """PNG files to every W&B logger as ``<prefix><name>`` images at ``step``."""
    for logger in loggers:
        if is_wandb(logger):
            for name, path in paths.items():
                logger.log_image(key=f"{prefix}{name}", images=[str(path)], step=step)


def log_probe_figures(loggers: Sequence[Any], result: ProbeResult, prefix: str, step: int) -> None:
    """This probe's coupling heat maps (one per probed K, ``result.ks``) and trajectory PCA as W&B images at ``step`` (keys
    ``<prefix>figures/coupling_k<K>``, ``<prefix>figures/trajectories_pca``), so that W&B's image slider
    shows them over training. Nothing is drawn without a W&B logger."""
    if not any(is_wandb(lg) for lg in loggers):
        return
    from alignscope.apps import plots

    labelled = {f"step {step}": result}
    builders: dict[str, Any] = {
        f"coupling_k{k}": partial(plots.coupling_heatmaps, labelled, k) for k in result.ks
    }
    builders["trajectories_pca"] = partial(plots.trajectory_pca, labelled)
    with tempfile.TemporaryDirectory() as tmp:  # W&B copies each image into the run when it is logged
        log_images(loggers, plots.save_all(builders, tmp), f"{prefix}figures/", step)


def summary_entries(summary: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``summary.json`` as flat W&B summary keys: ``<prefix>summary/<metric>/{init,final,change}`` and
    ``<prefix>summary/{init_step,final_step,monitor_seconds}``."""
    out: dict[str, Any] = {}
    for name, value in summary.items():
        if isinstance(value, Mapping):
            out |= {f"{prefix}summary/{name}/{part}": v for part, v in value.items()}
        else:
            out[f"{prefix}summary/{name}"] = value
    return out


def log_summary(loggers: Iterable[Any], summary: Mapping[str, Any], prefix: str) -> None:
    """Put :func:`summary_entries` into every W&B run's summary."""
    for logger in loggers:
        if is_wandb(logger):
            logger.experiment.summary.update(summary_entries(summary, prefix))


def log_artifact(loggers: Iterable[Any], paths: Mapping[str, Path], kind: str) -> None:
    """Files and folders (by their name in the artifact) as one W&B artifact of type ``kind``, named
    ``<kind>-<run id>``."""
    for logger in loggers:
        if not is_wandb(logger):
            continue
        import wandb

        run = logger.experiment
        artifact = wandb.Artifact(f"{kind}-{run.id}", type=kind)
        for name, path in paths.items():
            if path.is_dir():
                artifact.add_dir(str(path), name=name)
            elif path.is_file():
                artifact.add_file(str(path), name=name)
        run.log_artifact(artifact)

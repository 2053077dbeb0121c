"""Sweeps: skip jobs whose run folder is complete, and one GPU per job on a multi-GPU machine.

- ``complete.json``: written last by a job that finished (results, figures, loggers), with the sha256 of the
  job's resolved config less the keys that do not set numbers (:data:`NOT_NUMBERS`). A multirun job whose
  folder holds a ``complete.json`` of the same config (and the app's own results, checked by the app) is
  skipped with the line ``skipped: already complete``; a job that starts work removes the marker first, so
  an interrupted rerun never leaves a folder that looks complete.
- :func:`gpu_for_job`: job ``n`` of a process-per-job sweep (joblib, ``submitit_local``) that may use
  ``G > 1`` GPUs gets the GPU ``n mod G`` of them as its ``CUDA_VISIBLE_DEVICES`` (:func:`job_gpus`: joblib
  leaves a variable the user set alone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignscope.apps.run_folder import text_digest, write_json

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
NOT_NUMBERS = ("paths", "logger", "run_name", "group", "job_type", "tags", "overwrite", "ckpt_path")
"""Top-level config keys that name, log or locate a job without setting its numbers (left out of the digest)."""
SKIPPED = "skipped: already complete"
PROCESS_PER_JOB_LAUNCHERS = ("hydra_plugins.hydra_joblib_launcher", "submitit_launcher.LocalLauncher")
"""Launchers (``_target_`` substrings) that run each job in a process of its own on this machine."""


# --------------------------------------------------------------------------------------------- hydra state
def _hydra() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.types import RunMode

    hc = _hydra()
    return hc is not None and hc.mode == RunMode.MULTIRUN


# --------------------------------------------------------------------------------------------- completion
def config_digest(cfg: DictConfig) -> str:
    """sha256 of the resolved config less :data:`NOT_NUMBERS` (and ``hydra``)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    return text_digest({k: v for k, v in values.items() if k not in (*NOT_NUMBERS, "hydra")})


def mark_complete(run_dir: str | Path, app: str, cfg: DictConfig) -> None:
    """Write ``complete.json`` (app, config digest) into ``run_dir``, atomically."""
    write_json(Path(run_dir) / COMPLETE, {"app": app, "config_sha256": config_digest(cfg)})


def unmark(run_dir: str | Path) -> None:
    """Remove ``complete.json``: the folder is being (re)written."""
    (Path(run_dir) / COMPLETE).unlink(missing_ok=True)


def marked_complete(run_dir: str | Path, app: str, cfg: DictConfig) -> bool:
    """Whether ``run_dir`` holds a ``complete.json`` of ``app`` with this config's digest."""
    path = Path(run_dir) / COMPLETE
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored.get("app") == app and stored.get("config_sha256") == config_digest(cfg)


def fingerprint_agrees(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> bool:
    """Whether a stored ``fingerprint.json`` exists and equals ``current`` on every key of ``current``."""
    from alignscope.apps.run_folder import differences

    return stored is not None and not differences(stored, current)


def should_skip(run_dir: str | Path, app: str, cfg: DictConfig, results_ok: bool) -> bool:
    """In a multirun, whether the job is complete (a marker of this config and ``results_ok``); then log
    :data:`SKIPPED`. A job that goes on calls :func:`unmark` once its folder accepted it."""
    if not (in_multirun() and results_ok and marked_complete(run_dir, app, cfg)):
        return False
    log.info("%s: %s (%s); delete its %s to run it again", run_dir, SKIPPED, app, COMPLETE)
    return True


def probe_done(run_dir: Path, stored: Mapping[str, Any] | None, fp: Mapping[str, Any]) -> bool:
    """``alignscope-probe``: results written (``result/``, ``scalars.json``) and the fingerprint equal on
    every key known before the weights are loaded."""
    return (
        (run_dir / "result").is_dir()
        and (run_dir / "scalars.json").is_file()
        and fingerprint_agrees(stored, fp)
    )


def training_done(run_dir: Path, max_steps: int, model: Any) -> bool:
    """``alignscope-train``: ``summary.json`` written, ``metrics.json`` (written after the fit) at
    ``trainer.max_steps`` or beyond, and the monitor's fingerprint equal on the model class, the weights at
    init and the package version."""
    from alignscope.apps.run_folder import FINGERPRINT, package_version, weights_digest

    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        stored = json.loads((run_dir / FINGERPRINT).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not (run_dir / "summary.json").is_file() or metrics.get("global_step", -1) < max_steps:
        return False
    current = {
        "app": "AlignmentMonitor",
        "alignscope_version": package_version(),
        "model": {"class": type(model).__name__},
        "init_weights_sha256": weights_digest(model),
    }
    return fingerprint_agrees(stored, current)


# --------------------------------------------------------------------------------------------- GPUs
def gpu_for_job(job_num: int, visible: Sequence[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value for job ``job_num`` given the GPUs it may use: the one at
    ``job_num mod len(visible)`` when there is more than one; else None (leave the variable alone)."""
    if len(visible) <= 1:
        return None
    return str(visible[job_num % len(visible)])


def job_gpus(env: Mapping[str, str], count: Callable[[], int]) -> list[str]:
    """The GPUs a job may choose from: under ``submitit_local`` (``SUBMITIT_EXECUTOR=local``) those it set in
    ``CUDA_VISIBLE_DEVICES`` (``hydra.launcher.gpus_per_node``); otherwise none when the user set the variable,
    else every GPU of the machine (``count()``)."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if env.get("SUBMITIT_EXECUTOR") == "local":
        return [d for d in (devices or "").split(",") if d.strip()]
    if devices is not None:
        return []
    return [str(i) for i in range(count())]


def count_gpus() -> int:
    """The machine's NVIDIA GPUs (``nvidia-smi -L``), without initializing CUDA in this process; 0 if none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def register_gpu_resolver() -> None:
    """``${alignscope_gpu_count:}`` in configs: :func:`count_gpus` (the ``submitit_local`` preset's default
    ``gpus_per_node``)."""
    if not OmegaConf.has_resolver("alignscope_gpu_count"):
        OmegaConf.register_new_resolver("alignscope_gpu_count", count_gpus)


def assign_gpu() -> str | None:
    """In a multirun whose launcher runs each job in its own process (joblib, ``submitit_local``), set
    ``CUDA_VISIBLE_DEVICES`` to this job's GPU (:func:`gpu_for_job`, :func:`job_gpus`) before CUDA is
    initialized; return the value set, or None."""
    hc = _hydra()
    if not in_multirun() or hc is None:
        return None
    target = str(hc.launcher.get("_target_", ""))
    if not any(name in target for name in PROCESS_PER_JOB_LAUNCHERS):
        return None
    import torch

    if torch.cuda.is_initialized():  # too late to choose a device in this process
        return None
    device = gpu_for_job(int(hc.job.num), job_gpus(os.environ, count_gpus))
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("job %s: CUDA_VISIBLE_DEVICES=%s (one GPU per job)", hc.job.num, device)
    return device

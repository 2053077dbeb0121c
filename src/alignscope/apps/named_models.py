"""Models by name for Python users: ``alignscope.load_model("smollm2_135m")`` returns ``(model, tokenizer)``.

A name is resolved to a model spec, which the one loader :func:`alignscope.models.load_model` (``**spec``)
turns into a model:

- a ``conf/model`` entry (``smollm2_135m``, ``gpt2``, ``tiny_llama``, ...): composed by Hydra exactly as the
  apps compose ``model=<name>``, so an entry means the same model here and in ``alignscope-probe``;
- an existing folder written by ``save_pretrained`` (or a name starting with ``.``, ``/`` or ``~``): the
  ``local`` entry with ``path=<folder>``;
- otherwise a name with a ``/``: a Hugging Face hub id, the ``hf`` entry with ``source=hub``.

Anything else is an :class:`UnknownModelError` that lists the closest entry names.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from alignscope.apps.config import config_dir
from alignscope.models import load_model as load_from_spec
from alignscope.models import load_tokenizer
from alignscope.models.errors import ModelLoadError


class UnknownModelError(ModelLoadError):
    """A model name that is no ``conf/model`` entry, folder or hub id; the message lists close matches."""


def model_names() -> list[str]:
    """The ``conf/model`` entry names (``alignscope-probe model=<name>``), sorted."""
    return sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml") if not p.stem.startswith("_"))


def _compose_entry(entry: str, seed: int) -> dict[str, Any]:
    """The resolved ``conf/model/<entry>.yaml`` (its defaults applied) with ``seed``, as Hydra composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    outer = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    if outer is not None:  # called inside a Hydra app: compose on a fresh instance, then put the app's back
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(overrides=[f"+model={entry}", f"+seed={int(seed)}"])
    finally:
        if outer is not None:
            restore_gh_from_backup(outer)
    return OmegaConf.to_container(cfg.model, resolve=True)


def _entry_and_fields(name: str) -> tuple[str, dict[str, Any]]:
    """The ``conf/model`` entry a name resolves to and the fields the name sets (module docstring)."""
    names = model_names()
    if name in names:
        return name, {}
    folder = Path(name).expanduser()
    if folder.is_dir() or name.startswith((".", "/", "~")):
        return "local", {"name": "local", "path": str(folder.resolve())}
    if "/" in name:
        return "hf", {"name": name, "source": "hub", "hub_id": name, "init": "pretrained"}
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: {hint}Give a conf/model entry ({', '.join(names)}), a folder written by "
        "save_pretrained, or a Hugging Face hub id (owner/name)"
    )


def model_spec(name: str, init: str | None = None, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`alignscope.models.load_model` for ``name`` (module docstring).

    ``init``: ``"pretrained"`` or ``"random"`` (the seeded random-init twin); None keeps the entry's own.
    ``overrides``: other fields of the schema (``conf/model/_base.yaml``: ``dtype``, ``revision``, ``task``,
    ``device_map``, ``vocab_size``, ``config`` (merged into the entry's config overrides), ...); an unknown key is refused.
    """
    entry, fields = _entry_and_fields(name)
    spec = _compose_entry(entry, seed)
    for key in ("_target_", "_partial_"):
        spec.pop(key, None)
    spec.update(fields)
    settings = set(inspect.signature(load_from_spec).parameters)
    unknown = sorted(set(overrides) - settings)
    if unknown:
        raise TypeError(f"load_model got unknown settings {unknown}; the settings are {sorted(settings)}")
    if "config" in overrides:
        overrides["config"] = {**spec.get("config", {}), **dict(overrides["config"] or {})}
    spec.update(overrides)
    if init is not None:
        spec["init"] = init
    return spec


def load_model(
    name: str, init: str | None = None, seed: int = 0, tokenizer: bool = True, **overrides: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a ``conf/model`` entry name, a local folder or a hub id, in eval mode.

    Offline entries such as ``smollm2_135m`` and ``minilm_l6`` are fetched once into the cache
    (``$ALIGNSCOPE_CACHE``, default ``~/.cache/alignscope``). ``init="random"`` gives the random-init twin
    of the same config under ``seed``; ``init=None`` keeps the entry's own init. The tokenizer is None for a
    model built from settings without files (e.g. ``tiny_llama``) or when ``tokenizer=False``. Other
    settings: :func:`model_spec`. Not to be confused with :func:`alignscope.models.load_model`, the one
    loader that this function calls with the resolved spec and that returns the model alone.
    """
    spec = model_spec(name, init=init, seed=seed, **overrides)
    model = load_from_spec(**spec)
    has_files = spec.get("source") != "config" or spec.get("config_name")
    return model, (load_tokenizer(**spec) if tokenizer and has_files else None)

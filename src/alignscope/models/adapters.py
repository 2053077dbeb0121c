"""Block adapters: which modules are a Hugging Face model's blocks, how to call one, and its context length.

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
            copies of one token can share a call (:func:`alignscope.models.capture.token_copies_function`). False
            for GPT-Neo, whose local attention slices a window out of its own buffer by query position.
        final_norm_paths: candidate dotted paths to the norm the model applies after its last block (tried
            like ``block_paths``); empty for models without one (post-norm encoders).
        inputs: the forward keyword a prompt goes in as: ``"input_ids"`` (token ids ``[B, T]``) or
            ``"pixel_values"`` (images ``[B, C, H, W]``, vision transformers).
        prefix_tokens: vision models: the tokens the blocks see before the patch tokens (ViT's CLS token;
            DeiT's CLS and distillation tokens), so an image has ``prefix_tokens + patches`` tokens, the
            patches in row-major order. The default probed token of a vision model is the CLS token (0).
        causal_attention: each token sees only the tokens before it (a decoder), whether or not it can be
            evaluated alone against a KV cache (``causal``); None: the same as ``causal``. Used where
            reachability matters (:func:`alignscope.context_coupling`), e.g. for hybrid decoders.
        source: how the adapter was obtained: ``"registered"`` (the registry, :func:`register_adapter`) or
            ``"discovered"`` (found from the model's structure and checked, :mod:`alignscope.models.discovery`);
            recorded as ``meta["adapter"]``.
        notes: what discovery turned off and why (e.g. the single-token engine), carried into ``meta["notes"]``.
    """

    block_paths: tuple[str, ...]
    output_index: int = 0
    residual_form: str = "pre-norm"
    causal: bool = True
    token_copies: bool = True
    final_norm_paths: tuple[str, ...] = ()
    inputs: str = "input_ids"
    prefix_tokens: int = 0
    causal_attention: bool | None = None
    source: str = "registered"
    notes: tuple[str, ...] = ()

    @property
    def attends_back_only(self) -> bool:
        """Tokens see only earlier tokens (``causal_attention``, else ``causal``)."""
        return self.causal if self.causal_attention is None else self.causal_attention

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's block list, in forward order."""
        for root in _roots(model):
            for path in self.block_paths:
                mod = _get_path(root, path)
                if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                    return mod
        raise ValueError(
            f"{type(model).__name__}: none of the block paths {self.block_paths} holds a non-empty "
            "nn.ModuleList; register a corrected adapter with alignscope.models.register_adapter()"
        )

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm applied after the last block (Hugging Face's last hidden state is its output), or None
        for a family without one (post-norm encoders, whose last hidden state is the last block's output)."""
        if not self.final_norm_paths:
            return None
        for root in _roots(model):
            for path in self.final_norm_paths:
                mod = _get_path(root, path)
                if isinstance(mod, nn.Module):
                    return mod
        raise ValueError(
            f"{type(model).__name__}: none of the final-norm paths {self.final_norm_paths} holds a module; "
            "register a corrected adapter with alignscope.models.register_adapter()"
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


def _roots(model: nn.Module) -> list[nn.Module]:
    """Where adapter paths start: the model, its ``base_model`` when that is another module, and for a PEFT
    model the adapted Hugging Face model inside it (``get_base_model()``)."""
    roots = [model]
    for base in (getattr(model, "base_model", None), unwrap_model(model)):
        if isinstance(base, nn.Module) and all(base is not r for r in roots):
            roots.append(base)
    return roots


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model a probe runs: inside a ``torch.compile`` wrapper its original module (hooks do
    not reach into a compiled graph; the parameters are the same), inside a PEFT ``PeftModel`` the adapted
    base model (its adapter layers injected, so its forward is the PeftModel's); else ``model`` itself."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo OptimizedModule
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
            continue
        get_base = getattr(type(model), "get_base_model", None)
        if callable(get_base) and type(model).__module__.startswith("peft."):
            inner = model.get_base_model()
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                continue
        return model


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_DECODER = BlockAdapter(block_paths=("model.layers", "layers"), final_norm_paths=("model.norm", "norm"))
_GPT2_STYLE = BlockAdapter(block_paths=("transformer.h", "h"), final_norm_paths=("transformer.ln_f", "ln_f"))
_ENCODER = BlockAdapter(
    block_paths=("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
    residual_form="post-norm",
    causal=False,
)
_VISION = BlockAdapter(
    block_paths=("layers", "encoder.layer"),  # transformers 5, 4
    causal=False,
    inputs="pixel_values",
    prefix_tokens=1,
)

ADAPTERS: dict[str, BlockAdapter] = {
    "gpt2": _GPT2_STYLE,
    "falcon": _GPT2_STYLE,
    "gpt_neo": dataclasses.replace(_GPT2_STYLE, token_copies=False),
    "mpt": BlockAdapter(
        block_paths=("transformer.blocks", "blocks"), final_norm_paths=("transformer.norm_f", "norm_f")
    ),
    "gpt_neox": BlockAdapter(
        block_paths=("gpt_neox.layers", "layers"),
        final_norm_paths=("gpt_neox.final_layer_norm", "final_layer_norm"),
    ),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,  # sliding-window and global blocks; the masks come in through the block call
    "phi": dataclasses.replace(_DECODER, final_norm_paths=("model.final_layernorm", "final_layernorm")),
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "vit": _VISION,
    "deit": dataclasses.replace(_VISION, prefix_tokens=2),
}
"""Registered adapters by ``config.model_type``; every entry is tested on a tiny model built from config."""


def register_adapter(model_type: str, adapter: BlockAdapter) -> None:
    """Register (or replace) the adapter for a Hugging Face ``config.model_type``."""
    if not isinstance(adapter, BlockAdapter):
        raise TypeError("adapter must be an alignscope.models.BlockAdapter")
    ADAPTERS[model_type] = adapter


def get_adapter(model: nn.Module) -> BlockAdapter:
    """The registered adapter for ``model.config.model_type``, else one discovered from the model's structure
    and checked on a short forward (:func:`alignscope.models.discovery.discover_adapter`), else a clear error
    naming the registration hook."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"{type(model).__name__} has no Hugging Face config.model_type; alignscope probes Hugging Face "
            "transformers models (PreTrainedModel)"
        )
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    from alignscope.models.discovery import discover_adapter

    return discover_adapter(unwrap_model(model))


def _peft_configs(model: nn.Module) -> dict[str, Any]:
    """A PEFT ``PeftModel``'s adapter configs by name (also inside a ``torch.compile`` wrapper), else {}."""
    inner = getattr(model, "_orig_mod", model)
    if not type(inner).__module__.startswith("peft."):
        return {}
    return dict(getattr(inner, "peft_config", None) or {})


def _peft_type(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def peft_types(model: nn.Module) -> list[str] | None:
    """The PEFT types of a ``PeftModel``'s adapters (e.g. ``["LORA"]``, ``meta["peft"]``), else None."""
    configs = _peft_configs(model)
    return sorted({_peft_type(c) for c in configs.values()}) if configs else None


def check_peft(model: nn.Module) -> None:
    """Refuse a PEFT model with prompt-learning adapters (prompt tuning, prefix tuning, p-tuning): PEFT
    applies them in the ``PeftModel``'s own forward (virtual tokens, prefix keys and values), outside the
    base model that a probe runs, so the probe would silently measure the unadapted model."""
    prompt = sorted(
        _peft_type(c) for c in _peft_configs(model).values() if getattr(c, "is_prompt_learning", False)
    )
    if prompt:
        raise ValueError(
            f"this PeftModel has prompt-learning adapters ({', '.join(prompt)}), which PEFT applies outside the "
            "base model's blocks (virtual tokens, prefix keys and values); alignscope probes the blocks of the "
            "base model, so it would measure the model without them. Adapters that PEFT injects into the "
            "layers (LoRA, LoHa, LoKr, IA3, ...) are supported"
        )


def config_attr(model: nn.Module, name: str) -> Any:
    """``model.config.<name>``, or that of its text config for a composite model (e.g. a vision-language
    model's ``hidden_size``); None when neither has it."""
    config = getattr(model, "config", None)
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), name, None)
        except ValueError:  # several text configs
            value = None
    return value


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


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme supports, when its config says so. A position
    embedding with a padding row (RoBERTa) numbers positions from ``padding_idx + 1``: that many fewer fit."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "max_seq_len"):
        value = config_attr(model, attr)
        if isinstance(value, int) and value > 0:
            embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
            positions = getattr(embeddings, "position_embeddings", None)
            offset = positions.padding_idx if isinstance(positions, nn.Embedding) else None
            return value - offset - 1 if offset is not None else value
    return None

"""The inputs of a probe: prompts as per-prompt id tensors with padding removed, and the probed positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.models import config_attr, context_length
from alignscope.models.adapters import BlockAdapter
from alignscope.models.discovery import vision_attr

TokenSpec = str | int | Sequence[int]
"""``"last"`` (each prompt's last real token), ``"all"``, or explicit positions (negative from the end)."""


def prompt_inputs(
    model: nn.Module,
    adapter: BlockAdapter,
    input_ids: Any,
    pixel_values: Tensor | None,
    attention_mask: Tensor | None,
    tokenizer: Any,
) -> tuple[list[Tensor], list[int]]:
    """Each prompt's model input without the batch axis (token ids ``[T]``, padding removed, or pixels
    ``[C, H, W]``) and the number of tokens its blocks see. Exactly one of ``input_ids`` and
    ``pixel_values`` must be given, the one ``adapter.inputs`` names."""
    name = type(model).__name__
    if (input_ids is None) == (pixel_values is None):
        given = "both" if input_ids is not None else "neither"
        raise ValueError(
            f"give exactly one of input_ids (token ids, text) and pixel_values (images); got {given}"
        )
    if adapter.inputs == "pixel_values":
        if pixel_values is None:
            raise ValueError(
                f"{name} is a vision model: pass pixel_values=[B, C, H, W] images, not input_ids"
            )
        if attention_mask is not None:
            raise ValueError("attention_mask is only for token ids; images have no padding")
        return pixel_prompts(pixel_values, model.config, adapter.prefix_tokens)
    if pixel_values is not None:
        raise ValueError(f"{name} takes token ids (input_ids), not pixel_values")
    vocab = config_attr(model, "vocab_size")
    seqs = prompt_sequences(input_ids, attention_mask, tokenizer, vocab, context_length(model))
    return seqs, [len(s) for s in seqs]


def pixel_prompts(pixel_values: Tensor, config: Any, prefix_tokens: int) -> tuple[list[Tensor], list[int]]:
    """Per-image ``[C, H, W]`` tensors of ``pixel_values`` (``[B, C, H, W]`` or ``[C, H, W]``), checked
    against the config's ``num_channels`` and ``image_size``, and each image's token count:
    ``prefix_tokens`` plus one per ``patch_size`` patch."""
    if not isinstance(pixel_values, Tensor):
        raise TypeError(f"pixel_values must be a tensor [B, C, H, W], got {type(pixel_values).__name__}")
    px = pixel_values[None] if pixel_values.ndim == 3 else pixel_values
    if px.ndim != 4 or px.shape[0] == 0:
        raise ValueError(
            f"pixel_values must be [B, C, H, W] or [C, H, W], got shape {tuple(pixel_values.shape)}"
        )
    if not px.is_floating_point():
        raise TypeError(f"pixel_values must be floating point (normalised images), got dtype {px.dtype}")
    size, patch = _pair(vision_attr(config, "image_size")), _pair(vision_attr(config, "patch_size"))
    expected = (vision_attr(config, "num_channels") or 3, *size)
    if tuple(px.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values have [C, H, W] = {list(px.shape[1:])}, the model takes {list(expected)} "
            "(config.num_channels, config.image_size); resize the images, e.g. with the model's image processor"
        )
    tokens = prefix_tokens + (size[0] // patch[0]) * (size[1] // patch[1])
    return list(px), [tokens] * px.shape[0]


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def prompt_sequences(
    input_ids: Any, attention_mask: Tensor | None, tokenizer: Any, vocab: int | None, context: int | None
) -> list[Tensor]:
    """Per-prompt 1-D id tensors with padding removed, each checked against the vocabulary and the
    model's ``context`` length (None: no limit known)."""
    if isinstance(input_ids, str) or (
        isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(s, str) for s in input_ids)
    ):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: probe(model, texts, tokenizer=tokenizer)")
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        seqs = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
        if attention_mask is not None:
            raise ValueError("attention_mask is only for token ids; text prompts are tokenized one by one")
    elif isinstance(input_ids, Tensor):
        ids = input_ids
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if attention_mask is not None:
            mask = attention_mask if attention_mask.ndim == 2 else attention_mask[None]
            if mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
                )
            seqs = [row[m.bool()] for row, m in zip(ids, mask)]
        else:
            seqs = list(ids)
        seqs = [s.long().cpu() for s in seqs]
    elif isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only supported with a tensor of input_ids")
        seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in input_ids]
    else:
        raise TypeError(
            f"input_ids must be a tensor, a list of id lists, or text; got {type(input_ids).__name__}"
        )
    if not seqs:
        raise ValueError("no prompts given: input_ids is empty")
    for b, s in enumerate(seqs):
        if s.numel() == 0:
            raise ValueError(f"prompt {b} has no real tokens (empty, or fully masked by attention_mask)")
        if vocab is not None and (int(s.max()) >= vocab or int(s.min()) < 0):
            raise ValueError(f"prompt {b} has token ids outside the model's vocabulary [0, {vocab})")
        if context is not None and s.numel() > context:
            raise ValueError(
                f"prompt {b} has {s.numel()} tokens, more than the model's context of {context} positions; "
                f"truncate it to at most {context} tokens, e.g. tokenizer(text, truncation=True, "
                f"max_length={context}) or input_ids[:, :{context}]"
            )
    return seqs


def token_positions(tokens: TokenSpec, length: int, prompt: int, cls_token: bool = False) -> list[int]:
    """The probed positions among a prompt's ``length`` tokens, sorted. ``"last"`` is the last token, or
    with ``cls_token`` (vision models, whose last token is merely the bottom-right patch) the CLS token, 0."""
    if tokens == "last":
        return [0] if cls_token else [length - 1]
    if tokens == "all":
        return list(range(length))
    if isinstance(tokens, str):
        raise ValueError(f"tokens must be 'last', 'all' or a list of positions, got {tokens!r}")
    wanted = [tokens] if isinstance(tokens, int) else list(tokens)
    if not wanted:
        raise ValueError("tokens is an empty list; give positions, 'last' or 'all'")
    out = []
    for t in wanted:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"token positions must be integers, got {t!r}")
        if not -length <= t < length:
            raise IndexError(
                f"token position {t} is beyond prompt {prompt}, which has {length} real tokens "
                f"(valid: 0..{length - 1}, or negative from the end)"
            )
        out.append(t % length)
    return sorted(set(out))

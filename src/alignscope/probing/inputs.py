"""The inputs of a probe: prompts as per-prompt id tensors with padding removed, and the probed positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TokenSpec = str | int | Sequence[int]
"""``"last"`` (each prompt's last real token), ``"all"``, or explicit positions (negative from the end)."""


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


def token_positions(tokens: TokenSpec, length: int, prompt: int) -> list[int]:
    if tokens == "last":
        return [length - 1]
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

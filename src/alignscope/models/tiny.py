"""Tiny random-init models of each supported family, built from configs (no download).

Used by the demo job and the tests; every model is seeded and small enough to probe in well under a second.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_COMMON = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=128
)
_GQA = dict(_COMMON, num_key_value_heads=2)
_VISION = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=12,
    patch_size=4,
)

TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # family: (config class, model class, config kwargs)
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_COMMON)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_GQA)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_GQA)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_COMMON)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_COMMON, eos_token_id=0, pad_token_id=1)),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=128),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            vocab_size=128,
            attention_types=[[["global", "local"], 1], [["global"], 1]],
            window_size=4,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(d_model=32, n_layers=3, n_heads=4, vocab_size=128, max_seq_len=64),
    ),
    "bert": ("BertConfig", "BertModel", dict(_COMMON, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(_COMMON, max_position_embeddings=72, pad_token_id=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GQA, head_dim=8)),
    # a sliding window of 4 tokens in blocks 0 and 2 (the window matters at 5+ tokens), global attention in 1
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _GQA,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_COMMON, eos_token_id=0, pad_token_id=1)),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(_VISION)),
    "deit": ("DeiTConfig", "DeiTModel", dict(_VISION)),
}
"""The families the adapters are tested on."""
VISION_FAMILIES = ("deit", "vit")
"""The families that take ``pixel_values`` (``[B, 3, 12, 12]`` images: 9 patches of 4 x 4)."""


def tiny_model(family: str = "gpt2", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-init model of ``family`` (see ``TINY_CONFIGS``), eval mode, float32, seeded."""
    import transformers

    from alignscope.models.build import random_init_twin

    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(TINY_CONFIGS)}")
    config_name, model_name, kwargs = TINY_CONFIGS[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    model = random_init_twin(config, seed=seed, model_class=getattr(transformers, model_name))
    if family == "deit":
        _draw_deit_embeddings(model, seed)
    return model


def _draw_deit_embeddings(model: nn.Module, seed: int) -> None:
    """DeiT's initializer leaves the CLS, distillation and position embeddings at zero, so ``x^0 = 0`` at
    the CLS token (the first LayerNorm's degenerate point). The tiny DeiT draws them from
    ``N(0, initializer_range)``, as ViT's initializer does for its CLS and position embeddings."""
    import torch

    emb = model.base_model.embeddings
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            p.copy_(torch.randn(p.shape, generator=g) * model.config.initializer_range)

"""Tiny random-init models of each supported family, built from configs (no download).

Used by the demo job and the tests; every model is seeded and small enough to probe in well under a second.
"""

from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------------------- tiny models of any model type
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
_TINY_LAYERS = 2
MAX_TINY_PARAMS = 10_000_000
"""A shrunk config that still builds a larger model than this is refused (a size attribute not shrunk)."""

_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1)
TYPE_OVERRIDES: dict[str, dict[str, Any]] = {
    # what the generic shrink cannot infer, by model type (set on the config and its sub-configs that have it)
    "bamba": dict(_MAMBA, attn_layer_indices=[1]),
    "cohere_compass_text": dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    ),
    "dbrx": {"attn_config.rope_theta": 1e4, "attn_config.clip_qkv": 8.0},
    "deepseek_v2": dict(num_experts_per_tok=2),
    "falcon_h1": dict(_MAMBA, mamba_d_ssm=64),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "granitemoehybrid": dict(_MAMBA, layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "longcat_flash": dict(qk_head_dim=16),
    "mamba2": dict(head_dim=16, n_groups=1, state_size=16),
    "nemotron": dict(num_key_value_heads=4),
    "nemotron_h": dict(
        num_hidden_layers=4, mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16
    ),
    "recurrent_gemma": dict(lru_width=32, block_types=["recurrent", "attention"]),
    "reformer": dict(is_decoder=True, axial_pos_shape=(8, 8), axial_pos_embds_dim=(16, 16)),
    "zamba2": dict(
        mamba_headdim=16,
        n_mamba_heads=4,
        mamba_d_state=16,
        hybrid_layer_ids=[1],
        attention_hidden_size=64,
        attention_head_dim=16,
    ),
}


def _tiny_size(key: str) -> int | None:
    """The tiny value of a config attribute by its name (None: leave it)."""
    k = key.lower()
    if "vocab_size" in k:
        return 128
    if "key_value_heads" in k or k in ("num_kv_heads", "n_kv_heads", "multi_query_group_num"):
        return 2
    if "heads" in k or k in ("n_head", "num_heads", "n_heads"):
        return 4
    if "experts_per_tok" in k or k in ("moe_topk", "top_k", "num_experts_per_token", "moe_k"):
        return 2
    if "shared_experts" in k:
        return 1
    if "experts" in k:
        return 4
    if k in ("n_group", "topk_group") or "first_k_dense" in k or k == "num_dense_layers":
        return 1  # one dense block, then mixture-of-experts blocks
    if "head_dim" in k or k == "kv_channels":
        return 8
    if "rope" in k or "rotary_dim" in k:
        return 4
    if "lora_rank" in k:
        return 16
    if "intermediate" in k or "ffn" in k or k in ("n_inner", "d_ff", "d_inner"):
        return 32 if ("moe" in k or "expert" in k) else 64
    if k.endswith(("hidden_size", "_dim", "embd", "embed", "d_model")) or k in (
        "dim",
        "n_embed",
        "embed_dim",
    ):
        return 32
    if k in ("max_position_embeddings", "n_positions", "n_ctx"):
        return 64
    return None


def shrink_config(config: Any, layers: int = _TINY_LAYERS, overrides: dict[str, Any] | None = None) -> Any:
    """``config`` (and its sub-configs) shrunk in place to a tiny model: ``layers`` blocks (more where the
    config's ``layer_types`` has more kinds, one block of each), width 32, 4 heads of 8, 4 experts, 128 tokens.
    Key-value heads stay equal to the heads where they were (multi-head latent attention), else 2."""
    from transformers import PretrainedConfig

    values = config.to_dict()
    _override(config, values, overrides)  # first: a validator may check them against the sizes
    heads = values.get("num_attention_heads")
    kv_equal = heads is not None and values.get("num_key_value_heads") in (heads, None)
    for key, value in values.items():
        if isinstance(value, bool) or not (isinstance(value, int) or (value is None and "head_dim" in key)):
            continue
        new = layers if key in _LAYER_KEYS else _tiny_size(key)
        if key == "num_key_value_heads" and kv_equal:
            new = 4
        if key.endswith("_period"):
            new = 2
        if new is not None and (value is None or value > new or key in _LAYER_KEYS):
            _set(config, key, new)
    for key, value in values.items():  # per-stage lists of hierarchical models (Swin): 4 heads, 1 block each
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if "heads" in key.lower():
                _set(config, key, [4] * len(value))
            elif key.lower() in ("depths", "depth"):
                _set(config, key, [1] * len(value))
    kinds = list(dict.fromkeys(getattr(config, "layer_types", None) or []))
    if kinds and not isinstance(getattr(type(config), "layer_types", None), property):
        count = max(layers, len(kinds))
        for key in _LAYER_KEYS:
            if key in values:
                _set(config, key, count)
        _set(config, "layer_types", (kinds * count)[:count])
    _override(config, values, overrides)  # and last: the generic shrink must not undo them
    for sub in list(vars(config).values()):
        if isinstance(sub, PretrainedConfig):
            shrink_config(sub, layers, overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 128:
            _set(config, key, 1)
    return config


def _override(config: Any, values: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    """Set the ``overrides`` that ``config`` has (``"attn_config.rope_theta"``: a sub-config's attribute)."""
    for key, value in (overrides or {}).items():
        sub, _, attr = key.rpartition(".")
        target = getattr(config, sub, None) if sub else config
        if target is not None and (sub or key in values or hasattr(config, key)):
            _set(target, attr, value)


def _set(config: Any, key: str, value: Any) -> None:
    with contextlib.suppress(Exception):  # a derived property, or a field its validator refuses
        setattr(config, key, value)


class TinyModelError(ValueError):
    """A shrunk config that is still too large; ``meta_model`` is the model on the meta device."""

    def __init__(self, message: str, meta_model: nn.Module) -> None:
        super().__init__(message)
        self.meta_model = meta_model


def tiny_model_of_type(model_type: str, class_name: str, seed: int = 0) -> nn.Module:
    """A tiny random-init ``transformers.<class_name>`` of ``model_type``, from ``AutoConfig.for_model``
    shrunk by :func:`shrink_config`; eval mode, float32, seeded. Raises when the shrunk model does not build
    or has more than :data:`MAX_TINY_PARAMS` parameters."""
    import torch
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, class_name)
    config = shrink_config(AutoConfig.for_model(model_type), overrides=TYPE_OVERRIDES.get(model_type))
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        config = config.get_text_config()
    with torch.device("meta"):
        skeleton = cls._from_config(config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_TINY_PARAMS:
        raise TinyModelError(f"the shrunk {model_type} config still has {size:,} parameters", skeleton)
    from alignscope.models.build import random_init_twin

    model = random_init_twin(config, seed=seed, model_class=cls)
    languages = getattr(model.config, "languages", None)
    if languages and hasattr(model, "set_default_language"):  # X-MOD: one adapter per language
        model.set_default_language(languages[0])
    return model

"""Every architecture of the installed transformers probes (Jacobians equal the independent whole-model
reference) or is refused with a reason, exactly as docs/models.md says; structure discovery and its checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from alignscope import probe
from alignscope.models import BlockAdapter, get_adapter, register_adapter
from alignscope.models.adapters import ADAPTERS
from alignscope.models.discovery import DiscoveryError, discover_adapter
from alignscope.models.reference import perturbed_block_output
from alignscope.probing.survey import MAPPINGS, read_table, survey_type, survey_types
from conftest import prompt_ids, tiny_model, whole_model_jacobian

MODELS_MD = Path(__file__).parents[1] / "docs" / "models.md"
TABLE = read_table(str(MODELS_MD))
CASES = [(task, model_type) for task in MAPPINGS for model_type in survey_types(task)]
SAME_TRANSFORMERS = f"transformers {transformers.__version__}\n" in MODELS_MD.read_text()
"""The table was generated with the installed transformers (another version may add or change types)."""


@pytest.mark.slow
@pytest.mark.parametrize(("task", "model_type"), CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_every_architecture_probes_or_is_refused_as_the_table_says(task, model_type):
    row = survey_type(task, model_type)
    assert row.status in ("works", "refused", "no tiny model"), f"{row.status}: {row.reason}"
    if row.status == "works":
        assert row.max_error <= 1e-4
    if row.status == "refused":
        assert row.reason, "a refusal must say why"
    if SAME_TRANSFORMERS:  # the table of another transformers version may not have the type, or differ
        expected = TABLE.get((task, model_type))
        assert expected is not None, (
            f"{task}/{model_type} is missing from docs/models.md: run scripts/survey_models.py"
        )
        assert row.status == expected, (
            f"docs/models.md says {expected}, the probe gives {row.status}: {row.reason}"
        )


def test_the_table_covers_the_installed_mappings_and_every_decoder_mostly_works():
    if not SAME_TRANSFORMERS:
        pytest.skip(
            f"docs/models.md is not for transformers {transformers.__version__}: rerun scripts/survey_models.py"
        )
    assert set(TABLE) == set(CASES), "docs/models.md is stale: run scripts/survey_models.py"
    causal = [s for (task, _), s in TABLE.items() if task == "causal_lm"]
    assert causal.count("works") >= 174


def _renamed(model, model_type: str):
    model.config.model_type = model_type
    return model


def test_a_discovered_adapter_gives_the_registered_adapters_numbers_and_says_so():
    ids = prompt_ids(1, 6)
    registered = probe(tiny_model("llama"), ids, tokens="all", keep_jacobians=True)
    model = _renamed(tiny_model("llama"), "llama_unregistered")
    discovered = probe(model, ids, tokens="all", keep_jacobians=True)
    assert registered.meta["adapter"] == "registered" and discovered.meta["adapter"] == "discovered"
    assert discovered.meta["engine"] == "single_token"
    torch.testing.assert_close(discovered.jacobians, registered.jacobians, atol=1e-6, rtol=0)
    adapter = get_adapter(model)
    assert adapter.block_paths == ("model.layers",) and adapter.final_norm_paths == ("model.norm",)
    assert adapter.causal and adapter is get_adapter(model)  # checked once per model


def test_discovery_finds_gpt2_style_stacks_and_its_final_norm():
    model = _renamed(tiny_model("gpt2"), "gpt2_unregistered")
    adapter = discover_adapter(model)
    assert adapter.block_paths == ("transformer.h",) and adapter.final_norm_paths == ("transformer.ln_f",)
    ids = prompt_ids(1, 5)
    res = probe(model, ids, keep_jacobians=True, include_final_norm=True)
    # the last block with the final norm: d ln_f(x^L) / d x^{L-1} = J_ln_f(x^L) (I + J_L), by autograd alone
    block = whole_model_jacobian(model, ids, 2, 4, 4)
    with torch.no_grad():
        x_last = perturbed_block_output(model, ids, 2, 4, 4)(torch.zeros(()))  # x^L at the token
    norm_jac = torch.autograd.functional.jacobian(model.transformer.ln_f, x_last)
    expected = norm_jac @ block - torch.eye(32)
    torch.testing.assert_close(res.jacobians[0, 2], expected, atol=1e-6 * expected.abs().max().item(), rtol=0)
    plain = probe(model, ids, keep_jacobians=True)
    assert (plain.jacobians[0, 2] - res.jacobians[0, 2]).abs().max() > 1e-2  # the norm is in


@pytest.mark.parametrize(
    ("model_type", "class_name", "norm"),
    [
        ("nanochat", "NanoChatForCausalLM", "model.norm"),  # one norm module for the embeddings and the end
        ("roberta-prelayernorm", "RobertaPreLayerNormForMaskedLM", "roberta_prelayernorm.LayerNorm"),
    ],
)
def test_discovery_finds_a_final_norm_used_twice_or_outside_the_stacks_parent(model_type, class_name, norm):
    from alignscope.models.tiny import tiny_model_of_type

    model = tiny_model_of_type(model_type, class_name)
    adapter = get_adapter(model)
    assert adapter.final_norm_paths == (norm,)
    ids = prompt_ids(1, 5)
    with_norm = probe(model, ids, keep_jacobians=True, include_final_norm=True)
    without = probe(model, ids, keep_jacobians=True)
    assert (with_norm.jacobians[0, -1] - without.jacobians[0, -1]).abs().max() > 1e-3


def test_blocks_without_a_gradient_or_fed_earlier_states_are_refused():
    from alignscope.models.tiny import tiny_model_of_type

    reformer = tiny_model_of_type("reformer", "ReformerModelWithLMHead")  # reversible layers under no_grad
    with pytest.raises(DiscoveryError, match="does not depend on its input under autograd"):
        probe(reformer, prompt_ids(1, 4))
    dense = tiny_model_of_type("inkling2_text", "Inkling2ForCausalLM")  # earlier blocks' states fed forward
    with pytest.raises(DiscoveryError, match="connections across blocks"):
        probe(dense, prompt_ids(1, 4))


def test_an_unregistered_vision_transformer_with_non_square_images_probes():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=[8, 12],
        patch_size=4,
    )
    torch.manual_seed(0)
    model = _renamed(ViTModel(config).eval(), "vit_unregistered")
    images = torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    res = probe(model, pixel_values=images, keep_jacobians=True)
    assert get_adapter(model).prefix_tokens == 1 and res.meta["adapter"] == "discovered"
    expected = whole_model_jacobian(model, images, 1, 0, 0) - torch.eye(32)
    torch.testing.assert_close(res.jacobians[0, 1], expected, atol=1e-5, rtol=0)


def test_a_stack_that_does_not_chain_is_refused_with_the_registration_hook():
    model = _renamed(tiny_model("llama"), "llama_unchained")
    # something outside the blocks changes the residual stream between blocks 0 and 1
    model.model.layers[1].register_forward_pre_hook(lambda m, args: (args[0] * 2.0, *args[1:]))
    with pytest.raises(DiscoveryError, match=r"do not chain.*register_adapter\('llama_unchained'"):
        probe(model, prompt_ids(1, 4))


def test_register_adapter_still_wins_over_discovery():
    model = _renamed(tiny_model("llama"), "llama_override")
    try:
        register_adapter("llama_override", BlockAdapter(block_paths=("model.layers",), causal=False))
        res = probe(model, prompt_ids(1, 4))
        assert res.meta["adapter"] == "registered" and res.meta["engine"] == "exact"
    finally:
        ADAPTERS.pop("llama_override", None)


def test_encoder_decoder_models_are_refused_and_their_encoder_probes():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    with pytest.raises(DiscoveryError, match="encoder-decoder.*get_encoder"):
        probe(model, prompt_ids(1, 4))
    encoder = model.get_encoder()
    ids = prompt_ids(1, 5)
    res = probe(encoder, ids, keep_jacobians=True)
    assert res.meta["engine"] == "exact" and res.meta["adapter"] == "discovered"
    expected = whole_model_jacobian(encoder, ids, 1, 4, 4) - torch.eye(32)
    torch.testing.assert_close(res.jacobians[0, 1], expected, atol=1e-5, rtol=0)


def test_a_hybrid_stack_whose_single_token_call_fails_its_check_uses_the_full_sequence_engine():
    from alignscope.models.tiny import tiny_model_of_type

    model = tiny_model_of_type("qwen3_next", "Qwen3NextForCausalLM")
    adapter = get_adapter(model)
    assert adapter.source == "discovered" and not adapter.causal
    res = probe(model, prompt_ids(1, 5))
    assert res.meta["engine"] == "exact"
    assert any("single-token engine is off" in note for note in res.meta["notes"])
    assert (
        adapter.attends_back_only
    )  # still a causal decoder for context coupling: no pairs from later tokens
    from alignscope import context_coupling

    ctx = context_coupling(model, prompt_ids(1, 5)[0], t_in=2)
    assert ctx.pairs[:, 1].tolist() == [2, 3, 4]
    assert not any(torch.isnan(m).any() for m in ctx.coupling.values())


def test_an_unregistered_model_on_the_meta_device_is_refused_with_what_to_do():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    with torch.device("meta"):
        model = _renamed(LlamaForCausalLM(config), "llama_on_meta")
    with pytest.raises(DiscoveryError, match="meta device"):
        probe(model, prompt_ids(1, 4))

"""Mixture-of-experts blocks: the Jacobian with the router's top-k choice held as taken, equal to the
independent whole-model reference for every engine, and to finite differences."""

from __future__ import annotations

import pytest
import torch

from alignscope import probe
from alignscope.core.randomized import RandomizedSVD
from alignscope.models.reference import perturbed_block_output
from alignscope.models.tiny import tiny_model_of_type
from conftest import prompt_ids, whole_model_jacobian

MOE = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
TOKENS = [2, 5]


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_model(request):
    return tiny_model_of_type(request.param, MOE[request.param])


@pytest.fixture(scope="module")
def reference(moe_model):
    """``[tokens, blocks, d, d]`` residual Jacobians by autograd through the whole model's forward."""
    ids = prompt_ids(1, 6)
    d = moe_model.config.hidden_size
    blocks = moe_model.config.num_hidden_layers
    return ids, torch.stack(
        [
            torch.stack(
                [whole_model_jacobian(moe_model, ids, layer, t, t) - torch.eye(d) for layer in range(blocks)]
            )
            for t in TOKENS
        ]
    )


def test_the_last_block_of_each_tiny_moe_model_has_experts(moe_model):
    assert moe_model.config.num_hidden_layers >= 2
    last = moe_model.model.layers[-1]
    assert any("expert" in name for name, _ in last.named_modules())


@pytest.mark.parametrize("engine", ["exact", "single_token", "auto"])
def test_moe_jacobians_equal_the_reference(moe_model, reference, engine):
    ids, expected = reference
    res = probe(moe_model, ids, tokens=TOKENS, keep_jacobians=True, engine=engine)
    assert res.meta["engine"] in ("exact", "single_token")
    torch.testing.assert_close(res.jacobians, expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


def test_the_randomized_engine_finds_the_moe_blocks_top_singular_values(moe_model, reference):
    ids, expected = reference
    res = probe(moe_model, ids, tokens=TOKENS, ks=(2,), engine=RandomizedSVD(oversample=8, power_iters=2))
    assert res.meta["engine"] == "randomized"
    s = torch.linalg.svdvals(expected)[..., :2]
    # within the engine's own error statement: |s_k - s~_k| <= ||J v_k - s~_k u_k||
    bound = res.extras["triplet_residuals"] + 1e-5
    assert ((res.singular_values[..., :2] - s).abs() <= bound).all()
    assert (res.singular_values[..., :2] - s).abs().max() < 0.05 * s.max()


def test_the_moe_jacobian_is_the_derivative_at_the_taken_routing_by_finite_differences():
    model = tiny_model_of_type("mixtral", "MixtralForCausalLM").double()
    ids = prompt_ids(1, 5)
    assert model.config._experts_implementation == "grouped_mm"  # no float64 kernel: the probe loops
    res = probe(model, ids, tokens=[4], layers=[1], keep_jacobians=True, dtype=torch.float64)
    assert model.config._experts_implementation == "grouped_mm"  # put back
    model.set_experts_implementation("eager")
    block_output = perturbed_block_output(model, ids, 1, 4, 4)

    def run(delta):
        with torch.no_grad():
            return block_output(delta)

    # small enough that no token changes experts; transformers' norms round float64 through float32, so
    # central differences are good to ~1e-4 here
    d, eps = model.config.hidden_size, 1e-5
    fd = torch.stack(
        [(run(eps * e) - run(-eps * e)) / (2 * eps) for e in torch.eye(d, dtype=torch.float64)], 1
    )
    torch.testing.assert_close(res.jacobians[0, 0], fd - torch.eye(d, dtype=torch.float64), atol=2e-4, rtol=0)

"""bitsandbytes-quantized models: 8-bit probes on the CPU with the Jacobian of the dequantized computation
(equal to the reference through the quantized model's forward); 4-bit on the CPU is refused with what to do."""

from __future__ import annotations

import pytest
import torch

from alignscope import probe
from conftest import prompt_ids, tiny_model, whole_model_jacobian

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama128")
    # 128 wide: bitsandbytes quantizes in blocks of 64 input features
    tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2).save_pretrained(folder)
    return folder


def _load(folder, **quantization):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**quantization)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()


@pytest.mark.parametrize("engine", ["exact", "single_token"])
def test_an_8bit_model_probes_with_the_jacobian_of_its_dequantized_computation(saved_llama, engine):
    model = _load(saved_llama, load_in_8bit=True)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    ids = prompt_ids(1, 5)
    res = probe(model, ids, tokens=[1, 4], keep_jacobians=True, engine=engine)
    assert res.meta["quantization"] == "bitsandbytes 8-bit"
    assert any("compute in their own dtype" in note for note in res.meta["notes"])
    for p, t in enumerate((1, 4)):
        for layer in range(2):
            expected = whole_model_jacobian(model, ids, layer, t, t) - torch.eye(128)
            torch.testing.assert_close(res.jacobians[p, layer], expected, atol=1e-5, rtol=0)
    # the quantized weights are not the float ones: the Jacobians differ from the float model's, a little
    float_res = probe(
        tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2),
        ids,
        tokens=[1, 4],
        keep_jacobians=True,
        engine=engine,
    )
    gap = (float_res.jacobians - res.jacobians).abs().max() / float_res.jacobians.abs().max()
    assert 1e-4 < gap < 0.2


def test_a_4bit_model_on_the_cpu_is_refused_with_what_to_do(saved_llama):
    model = _load(saved_llama, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"4-bit layers on the CPU.*CUDA GPU.*load_in_8bit.*float dtype"):
        probe(model, prompt_ids(1, 4))


def test_an_untested_quantization_scheme_is_refused_with_how_to_load_it_in_a_float_dtype():
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match=r"quantized with 'gptq'.*float dtype.*torch_dtype=torch.bfloat16"):
        probe(model, prompt_ids(1, 4))

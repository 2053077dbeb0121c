"""probe(): shapes, every scalar finite, save/load, caller state untouched, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from alignscope import ProbeResult, probe
from alignscope.core.metrics import coupling_matrix, line_shape_score
from conftest import prompt_ids, tiny_model, whole_model_jacobian


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_probe_shapes_and_scalars(family):
    model = tiny_model(family)
    res = probe(model, prompt_ids(3, 8), ks=(4, 10, 50), keep_jacobians=True)
    P, L, d = 3, 3, 32
    assert res.hidden_states.shape == (P, L + 1, d)
    assert res.jacobians.shape == (P, L, d, d)
    assert res.tokens.tolist() == [[0, 7], [1, 7], [2, 7]]
    for k in (4, 10, 50):
        assert res.coupling[k].shape == (P, L, L) and res.coupling_vju[k].shape == (P, L, L)
        assert res.alignment[k].shape == (P, L, L)
    assert res.meta["k_clipped"] == [50] and res.meta["k_effective"]["50"] == d
    scalars = res.scalars()
    for name in (
        "coupling/k10",
        "coupling_vju/k10",
        "alignment/k10",
        "alignment_across/k10",
        "lss/mean",
        "expodistance/step_slope",
        "expodistance/norm_r2",
        "spectra/s1_mean",
        "spectra/inv_s1_r2",
        "spectra/stable_rank/block_02",
        "coupling/k10/block_01",
        "linearization/cosine",
    ):
        assert name in scalars
    assert all(math.isfinite(v) for v in scalars.values()), {
        k: v for k, v in scalars.items() if not math.isfinite(v)
    }
    # stored metrics agree with the public functions applied to the kept Jacobians
    assert torch.allclose(res.coupling[10][1], coupling_matrix(res.jacobians[1], 10), atol=1e-6)
    assert torch.allclose(res.lss[2], line_shape_score(res.hidden_states[2]))
    expect = 1 - res.coupling[10] ** 2
    off = ~torch.eye(L, dtype=torch.bool)
    assert scalars["coupling/k10"] == pytest.approx(float(expect[:, off].mean()), rel=1e-5)


def test_probe_jacobian_is_residual_and_matches_autograd():
    model = tiny_model("llama")
    ids = prompt_ids(1, 6, seed=7)
    res = probe(model, ids, tokens=[2], layers=[1], keep_jacobians=True)
    expected = whole_model_jacobian(model, ids, 1, 2, 2) - torch.eye(32)
    assert torch.allclose(res.jacobians[0, 0], expected, atol=1e-5)
    assert res.layers == [1] and res.linearization_cosine is None


def test_probe_trajectory_is_block_io_not_final_norm():
    model = tiny_model("llama")
    ids = prompt_ids(1, 6)
    res = probe(model, ids, tokens="all")
    with torch.no_grad():
        hf = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(3):  # res.hidden_states[t, l] is token t's x^l
        assert torch.allclose(res.hidden_states[:, layer], hf[layer][0], atol=1e-5)
    # HF's last entry has the final norm applied; ours is the last block's raw output
    assert not torch.allclose(res.hidden_states[:, 3], hf[3][0], atol=1e-3)
    final_norm = model.model.norm
    with torch.no_grad():
        assert torch.allclose(final_norm(res.hidden_states[:, 3]), hf[3][0], atol=1e-5)


def test_probe_leaves_model_untouched():
    model = tiny_model("gpt2")
    model.train()
    model.lm_head.weight.requires_grad_(True)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attn = model.config._attn_implementation
    with torch.no_grad():
        probe(model, prompt_ids(2, 6))
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.config._attn_implementation == attn
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_probe_is_deterministic_and_uses_eval_mode():
    model = tiny_model("gpt2")  # dropout 0.1 in train mode
    model.train()
    a, b = probe(model, prompt_ids(2, 6)), probe(model, prompt_ids(2, 6))
    assert torch.equal(a.coupling[10], b.coupling[10])


def test_padding_is_removed_either_side():
    model = tiny_model("llama")
    ids = prompt_ids(2, 6, seed=5)
    plain = probe(model, ids[:1, :4])
    right = torch.cat([ids[:1, :4], torch.zeros(1, 2, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:1, :4]], 1)
    mask_r = torch.tensor([[1, 1, 1, 1, 0, 0]])
    mask_l = torch.tensor([[0, 0, 1, 1, 1, 1]])
    for batch, mask in ((right, mask_r), (left, mask_l)):
        res = probe(model, batch, attention_mask=mask)
        assert res.tokens.tolist() == [[0, 3]]
        assert torch.allclose(res.coupling[10], plain.coupling[10], atol=1e-6)


def test_text_prompts_with_a_tokenizer():
    class CharTokenizer:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 128 for c in text]}

    model = tiny_model("gpt2")
    res = probe(model, ["hello", "hi there"], tokenizer=CharTokenizer())
    assert res.tokens.tolist() == [[0, 4], [1, 7]]
    with pytest.raises(ValueError, match="tokenizer"):
        probe(model, ["hello"])


def test_token_options():
    model = tiny_model("gpt2")
    ids = prompt_ids(2, 5)
    assert probe(model, ids, tokens="all").tokens.shape == (10, 2)
    assert probe(model, ids, tokens=[0, -1]).tokens.tolist() == [[0, 0], [0, 4], [1, 0], [1, 4]]


def test_save_load_round_trip(tmp_path):
    model = tiny_model("gpt2")
    res = probe(model, prompt_ids(2, 6), ks=(3, 10), keep_jacobians=True)
    folder = res.save(tmp_path / "probe")
    assert {p.name for p in folder.iterdir()} == {"tensors.safetensors", "meta.json", "scalars.json"}
    back = ProbeResult.load(folder)
    assert back.layers == res.layers and back.meta == res.meta and back.ks == res.ks
    for k in res.ks:
        assert torch.equal(back.coupling[k], res.coupling[k]) and torch.equal(
            back.alignment[k], res.alignment[k]
        )
    for name in ("tokens", "hidden_states", "jacobians", "singular_values", "lss", "linearization_cosine"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    a, b = res.scalars(), back.scalars()
    assert a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
    with pytest.raises(FileNotFoundError, match="not a saved ProbeResult"):
        ProbeResult.load(tmp_path)


def test_float64_on_request():
    model = tiny_model("gpt2")
    res = probe(model, prompt_ids(1, 5), dtype=torch.float64, keep_jacobians=True)
    assert res.jacobians.dtype == torch.float64 and res.meta["dtype"] == "float64"
    res32 = probe(model, prompt_ids(1, 5), keep_jacobians=True)
    assert torch.allclose(res.jacobians.float(), res32.jacobians, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32


def test_nonfinite_jacobians_are_flagged_not_dropped():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    res = probe(model, prompt_ids(2, 5))
    # block 1's NaN weight also makes block 2's input (hence Jacobian) non-finite
    assert res.nonfinite[:, 1:].all() and not res.nonfinite[:, 0].any()
    assert res.singular_values.shape == (2, 3, 32)  # nothing dropped
    s = res.scalars()
    assert s["nonfinite/jacobians"] == 4.0
    assert math.isnan(s["spectra/s1/block_01"]) and math.isfinite(s["spectra/s1/block_00"])
    assert math.isnan(s["coupling/k10"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(layers=[3]), IndexError, "out of range: the model has 3 blocks"),
        (dict(layers=[-4]), IndexError, "out of range"),
        (dict(tokens=[9]), IndexError, "beyond prompt 0, which has 5 real tokens"),
        (dict(tokens="first"), ValueError, "'last', 'all'"),
        (dict(ks=(0,)), ValueError, "positive integer"),
        (dict(ks=()), ValueError, "ks is empty"),
        (dict(dtype=torch.float16), ValueError, "float32 or torch.float64"),
        (dict(attention="flash"), ValueError, "eager"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        probe(tiny_model("gpt2"), prompt_ids(1, 5), **kwargs)


def test_bad_inputs():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="input_ids is empty"):
        probe(model, [])
    with pytest.raises(ValueError, match="no real tokens"):
        probe(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no real tokens"):
        probe(model, prompt_ids(2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        probe(model, torch.tensor([[1, 500]]))
    with pytest.raises(TypeError, match="integer token ids"):
        probe(model, torch.rand(1, 4))
    with pytest.raises(ValueError, match="does not match"):
        probe(model, prompt_ids(1, 4), attention_mask=torch.ones(1, 5))


def test_short_prompts_single_block_and_caller_inference_mode():
    model = tiny_model("llama")
    one = probe(model, torch.tensor([[5]]))
    assert one.tokens.tolist() == [[0, 0]] and math.isfinite(one.scalars()["coupling/k10"])
    single = probe(model, torch.tensor([[5, 6, 7]]), layers=[1])
    assert math.isnan(single.scalars()["coupling/k10"])  # no block pairs: reported as NaN, not dropped
    assert single.coupling[10].shape == (1, 1, 1)
    with torch.inference_mode():
        inside = probe(model, torch.tensor([[5, 6, 7]]))
    assert torch.equal(inside.coupling[10], probe(model, torch.tensor([[5, 6, 7]])).coupling[10])


def test_bfloat16_model_probed_in_float32():
    model = tiny_model("llama").to(torch.bfloat16)
    res = probe(model, prompt_ids(1, 5), keep_jacobians=True)
    assert res.jacobians.dtype == torch.float32 and next(model.parameters()).dtype == torch.bfloat16
    assert math.isfinite(res.scalars()["coupling/k10"])


def test_token_jacobians_takes_one_prompt():
    from alignscope.probing.probe import token_jacobians

    with pytest.raises(ValueError, match="one prompt"):
        token_jacobians(tiny_model("gpt2"), prompt_ids(2, 4), pairs=[(0, 1)])
    with pytest.raises(ValueError, match="pairs is empty"):
        token_jacobians(tiny_model("gpt2"), prompt_ids(1, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sdpa_math_kernel_matches_eager(family):
    model = tiny_model(family)
    ids = prompt_ids(2, 6)
    eager = probe(model, ids, tokens="all", keep_jacobians=True)
    sdpa = probe(model, ids, tokens="all", keep_jacobians=True, attention="sdpa")
    assert torch.allclose(eager.jacobians, sdpa.jacobians, atol=1e-5)


def test_keep_blocks_and_concat(tmp_path):
    model = tiny_model("gpt2")
    ids = prompt_ids(3, 6)
    whole = probe(model, ids, keep_blocks=[0, 2], keep_jacobians=True)
    assert whole.extras["block_jacobians"].shape == (3, 2, 32, 32)
    assert torch.equal(whole.extras["block_jacobians"], whole.jacobians[:, [0, 2]])
    assert whole.meta["kept_blocks"] == [0, 2] and whole.meta["num_params"] > 0
    parts = [probe(model, ids[i : i + 1], keep_blocks=[0, 2], keep_jacobians=True) for i in range(3)]
    joined = ProbeResult.concat(parts)
    assert joined.tokens.tolist() == whole.tokens.tolist()
    assert torch.allclose(joined.coupling[10], whole.coupling[10], atol=1e-6)
    assert torch.allclose(joined.extras["block_jacobians"], whole.extras["block_jacobians"], atol=1e-6)
    assert joined.meta["prompt_lengths"] == [6, 6, 6]
    back = ProbeResult.load(joined.save(tmp_path / "r"))
    assert torch.equal(back.extras["block_jacobians"], joined.extras["block_jacobians"])
    with pytest.raises(ValueError, match="not among the probed layers"):
        probe(model, ids, layers=[1], keep_blocks=[0])
    with pytest.raises(ValueError, match="differ in layers"):
        ProbeResult.concat([parts[0], probe(model, ids[:1], layers=[0, 1])])

"""Vision transformers (ViT, DeiT): probe(model, pixel_values=...) against the whole model's autograd, the
default CLS token, every metric finite, the input errors, and random-init twins."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from alignscope import DegenerateResultWarning, RandomizedSVD, probe
from alignscope.models import get_adapter, random_init_twin
from conftest import pixels, prompt_ids, tiny_model, whole_model_jacobian

TOKENS = {"vit": 10, "deit": 11}  # 9 patches of a 12 x 12 image, after CLS (and DeiT's distillation token)


def test_jacobians_match_the_whole_model_autograd(vision_family):
    model = tiny_model(vision_family)
    px = pixels(1, seed=2)
    last = TOKENS[vision_family] - 1
    positions = [0, 1, last] if vision_family == "deit" else [0, last]  # CLS, distillation token, a patch
    res = probe(model, pixel_values=px, tokens=positions, layers=[0, 2], keep_jacobians=True)
    assert res.tokens.tolist() == [[0, t] for t in positions]
    for p, t in enumerate(positions):
        for i, layer in enumerate((0, 2)):
            expected = whole_model_jacobian(model, px, layer, t, t) - torch.eye(32)
            got = res.jacobians[p, i]
            assert torch.allclose(got, expected, atol=1e-5), (t, layer, float((got - expected).abs().max()))
            assert expected.abs().max() > 1e-2
    # the trajectory is the model's own: x^1, x^2 are its intermediate hidden states at the token
    with torch.no_grad():
        hidden = model(pixel_values=px, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        assert torch.allclose(res.hidden_states[:, layer], hidden[layer][0, positions], atol=1e-5)


def test_default_token_is_cls_and_every_metric_is_finite(vision_family):
    model = tiny_model(vision_family)
    res = probe(model, pixel_values=pixels(2), ks=(4, 8))
    assert res.tokens.tolist() == [[0, 0], [1, 0]]
    assert res.meta["prompt_lengths"] == [TOKENS[vision_family]] * 2
    assert res.meta["engine"] == "exact" and res.meta["model_type"] == vision_family
    assert res.meta["warnings"] == []
    scalars = res.scalars()
    for name in (
        "coupling/k4",
        "alignment/k8",
        "lss/mean",
        "expodistance/norm_slope",
        "linearization/cosine",
    ):
        assert name in scalars
    assert all(math.isfinite(v) for v in scalars.values()), {
        k: v for k, v in scalars.items() if not math.isfinite(v)
    }


def test_all_tokens_and_positions_from_the_end(vision_family):
    model = tiny_model(vision_family)
    n = TOKENS[vision_family]
    whole = probe(model, pixel_values=pixels(1)[0], tokens="all", keep_jacobians=True, ks=(4,))
    assert whole.tokens[:, 1].tolist() == list(range(n))
    last = probe(model, pixel_values=pixels(1), tokens=[-1], keep_jacobians=True, ks=(4,))
    assert last.tokens.tolist() == [[0, n - 1]]
    assert torch.allclose(last.jacobians[0], whole.jacobians[-1], atol=1e-6)
    with pytest.raises(IndexError, match=f"has {n} real tokens"):
        probe(model, pixel_values=pixels(1), tokens=[n])


def test_randomized_engine_agrees_with_exact_on_a_vision_model():
    model = tiny_model("vit")
    px = pixels(1, seed=4)
    exact = probe(model, pixel_values=px, ks=(4,), engine="exact")
    rand = probe(model, pixel_values=px, ks=(4,), engine=RandomizedSVD(oversample=28))
    assert rand.meta["engine"] == "randomized"
    assert torch.allclose(rand.coupling[4], exact.coupling[4], atol=1e-4)


def test_input_errors():
    vit, gpt2 = tiny_model("vit"), tiny_model("gpt2")
    with pytest.raises(ValueError, match="exactly one of input_ids .* got both"):
        probe(vit, prompt_ids(1, 4), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="got neither"):
        probe(vit)
    with pytest.raises(ValueError, match="vision model: pass pixel_values"):
        probe(vit, prompt_ids(1, 4))
    with pytest.raises(ValueError, match="not pixel_values"):
        probe(gpt2, pixel_values=pixels(1))
    with pytest.raises(ValueError, match=r"\[C, H, W\] = \[3, 16, 16\], the model takes \[3, 12, 12\]"):
        probe(vit, pixel_values=pixels(1, size=16))
    with pytest.raises(TypeError, match="floating point"):
        probe(vit, pixel_values=torch.zeros(1, 3, 12, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        probe(vit, pixel_values=torch.zeros(12, 12))
    with pytest.raises(ValueError, match="attention_mask is only for token ids"):
        probe(vit, pixel_values=pixels(1), attention_mask=torch.ones(1, 10))


def test_random_init_twins_and_other_vision_classes():
    model = tiny_model("vit")
    twin = random_init_twin(model, seed=3)
    assert type(twin) is type(model) and twin.config.alignscope_init_seed == 3
    blocks = get_adapter(model).blocks
    pairs = zip(blocks(twin).parameters(), blocks(model).parameters(), strict=True)
    assert not any(torch.equal(a, b) for a, b in pairs if a.std() > 0)  # redrawn, not copied
    from_config = random_init_twin(model.config, seed=0)
    assert isinstance(from_config, transformers.ViTForImageClassification)
    res = probe(twin, pixel_values=pixels(1), ks=(4,))
    assert all(math.isfinite(v) for v in res.scalars().values())
    base = random_init_twin(model.config, seed=1, model_class=transformers.ViTModel)
    assert len(get_adapter(base).blocks(base)) == 3
    assert probe(base, pixel_values=pixels(1), ks=(4,)).tokens.tolist() == [[0, 0]]
    # DeiT's own initializer leaves the CLS, distillation and position embeddings at zero: x^0 = 0 at CLS
    teacher = transformers.DeiTForImageClassificationWithTeacher
    deit = random_init_twin(tiny_model("deit").config, seed=1, model_class=teacher)
    assert len(get_adapter(deit).blocks(deit)) == 3
    with pytest.warns(DegenerateResultWarning, match="x\\^0 is the zero vector"):
        res = probe(deit, pixel_values=pixels(1), ks=(4,))
    assert math.isnan(res.scalars()["expodistance/norm_slope"]) and math.isfinite(
        res.scalars()["coupling/k4"]
    )


@pytest.mark.filterwarnings("ignore::alignscope.DegenerateResultWarning")  # one block: no coupling
def test_no_backward_kernel_runs_once_per_row():
    """The vision blocks' GELU, LayerNorm and attention take the batched backward formulas."""
    model = tiny_model("vit")
    with torch.profiler.profile() as prof:
        probe(model, pixel_values=pixels(1), layers=[0], ks=(4,))
    d = model.config.hidden_size
    per_row = {
        e.key: e.count
        for e in prof.key_averages()
        if e.count >= d and ("backward" in e.key.lower() or "index_put" in e.key)
    }
    assert not per_row, per_row

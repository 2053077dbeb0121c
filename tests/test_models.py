"""Adapters, the registration hook, and random-init twins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignscope import probe
from alignscope.models import (
    BlockAdapter,
    get_adapter,
    random_init_twin,
    register_adapter,
    resolve_layers,
)
from alignscope.models.adapters import ADAPTERS
from conftest import FAMILIES, tiny_model


def test_every_tested_family_has_an_adapter_and_three_blocks():
    for family in FAMILIES:
        model = tiny_model(family)
        assert len(get_adapter(model).blocks(model)) == 3, family


def test_unsupported_architecture_names_the_registration_hook():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(NotImplementedError, match=r"register_adapter\('oddformer'"):
        probe(Odd(), torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="no Hugging Face config"):
        get_adapter(nn.Linear(2, 2))


def test_register_adapter_makes_a_new_type_probeable():
    model = tiny_model("llama")
    model.config.model_type = "my_llama"
    try:
        register_adapter("my_llama", BlockAdapter(block_paths=("model.layers",)))
        assert probe(model, torch.tensor([[1, 2, 3]])).coupling[10].shape == (1, 3, 3)
    finally:
        ADAPTERS.pop("my_llama", None)
    with pytest.raises(TypeError):
        register_adapter("x", object())


def test_wrong_block_path_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="register a corrected adapter"):
        BlockAdapter(block_paths=("nowhere.layers",)).blocks(model)


def test_resolve_layers():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers([3, -1, 0], 4) == [0, 3]
    with pytest.raises(TypeError):
        resolve_layers([1.0], 4)
    with pytest.raises(ValueError, match="empty"):
        resolve_layers([], 4)


def test_random_init_twin_is_seeded_and_records_the_seed():
    model = tiny_model("llama", seed=0)
    a, b, c = (
        random_init_twin(model, seed=5),
        random_init_twin(model, seed=5),
        random_init_twin(model, seed=6),
    )
    assert type(a) is type(model) and a.config.alignscope_init_seed == 5
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(
        sa["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )
    # the library's initializer: Llama linear weights ~ N(0, initializer_range)
    std = float(sa["model.layers.0.mlp.up_proj.weight"].std())
    assert std == pytest.approx(model.config.initializer_range, rel=0.2)
    # the global RNG is not consumed
    torch.manual_seed(1)
    x = torch.rand(1)
    torch.manual_seed(1)
    random_init_twin(model, seed=3)
    assert torch.equal(torch.rand(1), x)


def test_random_init_twin_from_config():
    model = tiny_model("gpt2")
    twin = random_init_twin(model.config, seed=0)
    assert twin.config.model_type == "gpt2" and not twin.training


def test_every_registered_adapter_is_tested_on_a_tiny_model():
    assert set(ADAPTERS) <= set(FAMILIES)


def test_compiled_and_gradient_checkpointed_models_give_the_plain_models_numbers():
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = probe(tiny_model("llama"), ids, tokens="all", keep_jacobians=True)
    compiled = torch.compile(tiny_model("llama"), backend="eager")
    got = probe(compiled, ids, tokens="all", keep_jacobians=True)
    torch.testing.assert_close(got.jacobians, expected.jacobians, atol=1e-6, rtol=0)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    got = probe(model, ids, tokens="all", keep_jacobians=True)
    torch.testing.assert_close(got.jacobians, expected.jacobians, atol=1e-6, rtol=0)
    assert model.training and model.is_gradient_checkpointing  # the caller's state is kept

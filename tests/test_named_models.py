"""alignscope.load_model(name): a conf/model entry, a local folder or a hub id, through the one loader."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import alignscope
from alignscope.apps.config import config_dir
from alignscope.apps.named_models import UnknownModelError, model_spec
from conftest import save_tiny_local_model


def app_model(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("probe_app", overrides=list(overrides)).model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_entry_gives_the_apps_model_and_seed_sets_the_twin():
    model, tokenizer = alignscope.load_model("tiny_llama", init="random", seed=1)
    assert tokenizer is None  # built from settings: no files, no tokenizer
    assert same_weights(model, instantiate(app_model("model=tiny_llama", "seed=1"))())
    other, _ = alignscope.load_model("tiny_llama", seed=2, config={"num_hidden_layers": 2})
    assert other.config.num_hidden_layers == 2 and other.config.hidden_size == 128
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_offline_zoo_entry_resolves_to_the_probe_apps_spec():
    spec = OmegaConf.to_container(
        app_model("model=smollm2_135m", "model.init=random", "seed=3"), resolve=True
    )
    for key in ("_target_", "_partial_"):
        spec.pop(key)
    assert model_spec("smollm2_135m", init="random", seed=3) == spec
    assert model_spec("smollm2_135m")["init"] == "pretrained"


def test_local_folder_and_hub_id(tmp_path):
    folder = save_tiny_local_model(tmp_path / "m")
    model, tokenizer = alignscope.load_model(str(folder))
    saved = type(model).from_pretrained(folder)
    assert same_weights(model, saved) and not model.training
    assert (
        tokenizer("The cat")["input_ids"]
        == tokenizer.__class__.from_pretrained(folder)("The cat")["input_ids"]
    )
    twin, _ = alignscope.load_model(str(folder), init="random", seed=5)  # the folder holds seed 0's twin
    assert not same_weights(twin, saved)
    hub = model_spec("EleutherAI/pythia-70m", revision="step1000")
    assert (hub["source"], hub["hub_id"], hub["revision"], hub["init"]) == (
        "hub",
        "EleutherAI/pythia-70m",
        "step1000",
        "pretrained",
    )


def test_unknown_name_and_setting_are_refused_with_the_choices():
    with pytest.raises(UnknownModelError, match="did you mean smollm2_135m"):
        alignscope.load_model("smollm_135m")
    with pytest.raises(TypeError, match="unknown settings \\['dtyp'\\]"):
        model_spec("tiny_llama", dtyp="float16")


def test_works_inside_a_hydra_app_and_leaves_it_as_it_was():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        assert model_spec("tiny_gpt2")["model_type"] == "gpt2"
        assert compose("demo").model.name == "tiny_gpt2"  # the outer Hydra still composes

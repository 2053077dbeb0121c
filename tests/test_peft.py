"""PEFT models probe as adapted: adapters active, merged equal to unmerged, the reference through the
PeftModel's own forward; the random-init twin is the base architecture's; the monitor sees through PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from alignscope import probe, random_init_twin
from conftest import prompt_ids, tiny_model, whole_model_jacobian

peft = pytest.importorskip("peft")


def lora_model(seed: int = 0, kind: str = "lora"):
    """A tiny Llama with adapters whose weights are drawn (not PEFT's identity init), so they change J."""
    configs = {
        "lora": lambda: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
        ),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
        "ia3": lambda: peft.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
    }
    torch.manual_seed(seed)
    return peft.get_peft_model(tiny_model("llama"), configs[kind]()).eval()


@pytest.mark.parametrize("kind", ["lora", "loha", "ia3"])
def test_a_peft_model_probes_as_adapted_equal_to_the_reference(kind):
    model = lora_model(kind=kind)
    ids = prompt_ids(1, 6)
    res = probe(model, ids, tokens=[2, 5], keep_jacobians=True)
    assert res.meta["peft"] == [kind.upper()] and res.meta["model_class"] == "LlamaForCausalLM"
    for p, t in enumerate((2, 5)):
        for layer in range(3):
            expected = whole_model_jacobian(model, ids, layer, t, t) - torch.eye(32)
            torch.testing.assert_close(res.jacobians[p, layer], expected, atol=2e-5, rtol=0)
    with model.disable_adapter():  # the adapters move the numbers: they were active above
        base = probe(model, ids, tokens=[2, 5], keep_jacobians=True)
    assert (base.jacobians - res.jacobians).abs().max() > 1e-3
    assert base.meta["peft"] == [kind.upper()]


def test_merged_and_unmerged_lora_give_the_same_numbers_for_every_engine():
    model = lora_model()
    ids = prompt_ids(1, 6)
    unmerged = {
        e: probe(model, ids, tokens="all", engine=e, keep_jacobians=True) for e in ("exact", "single_token")
    }
    model.merge_adapter()
    try:
        for engine, before in unmerged.items():
            merged = probe(model, ids, tokens="all", engine=engine, keep_jacobians=True)
            torch.testing.assert_close(merged.jacobians, before.jacobians, atol=1e-5, rtol=0)
            torch.testing.assert_close(merged.coupling[10], before.coupling[10], atol=1e-4, rtol=0)
    finally:
        model.unmerge_adapter()
    fully = lora_model().merge_and_unload()
    torch.testing.assert_close(
        probe(fully, ids, tokens="all", keep_jacobians=True).jacobians,
        unmerged["single_token"].jacobians,
        atol=1e-5,
        rtol=0,
    )


def test_the_random_init_twin_of_a_peft_model_is_its_base_architectures():
    model = lora_model()
    twin = random_init_twin(model, seed=3)
    assert type(twin).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in twin.named_parameters())
    expected = random_init_twin(tiny_model("llama"), seed=3).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in twin.state_dict().items())


def test_the_monitor_probes_a_lightning_module_whose_model_is_wrapped_by_peft(tmp_path):
    import lightning.pytorch as pl

    from alignscope.apps.callback import AlignmentMonitor
    from test_callback import loaders, quiet_trainer

    class LoraLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = lora_model().train()

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return self.net(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    monitor = AlignmentMonitor(
        every_n_steps=2, log_spaced=False, prompts=prompt_ids(2, 6), dirpath=str(tmp_path)
    )
    module = LoraLM()
    frozen = {n: p.requires_grad for n, p in module.named_parameters()}
    trainer = quiet_trainer(max_steps=4, callbacks=[monitor])
    trainer.fit(module, loaders()[0])
    assert monitor.probed_steps == [0, 2, 4]
    assert {n: p.requires_grad for n, p in module.named_parameters()} == frozen  # LoRA-only training kept
    lines = [json.loads(x) for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert lines[0]["coupling/k10"] != lines[-1]["coupling/k10"]  # the LoRA weights trained, J moved
    final = probe(module.net, monitor.prompts, settings=monitor.settings)
    assert final.scalars()["coupling/k10"] == pytest.approx(lines[-1]["coupling/k10"], abs=1e-6)


def test_prompt_learning_adapters_which_act_outside_the_blocks_are_refused():
    model = peft.get_peft_model(
        tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    with pytest.raises(ValueError, match=r"prompt-learning adapters \(PREFIX_TUNING\).*LoRA"):
        probe(model, prompt_ids(1, 4))

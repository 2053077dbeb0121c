"""The AlignmentMonitor under FSDP: every rank gathers the full parameters for the probe and frees them after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignscope import probe
from alignscope.apps.resumed_probes import probe_folder
from alignscope.apps.run_folder import weights_digest
from alignscope.apps.sharded_params import full_params, is_sharded, unwrapped
from alignscope.models.tiny import tiny_model
from alignscope.probing.result import ProbeResult
from conftest import assert_results_close


def test_an_unsharded_model_is_probed_as_it_is():
    model = tiny_model("llama")
    assert not is_sharded(model) and not is_sharded(None) and unwrapped(model) is model
    with full_params(model, model) as full:
        assert full is model


def test_lightning_fsdp_probe_is_the_unsharded_probe(tmp_path):
    script = Path(__file__).parent / "fsdp_probe_fit.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    full = tiny_model("llama")  # the step-0 weights: the seeded init
    numel = sum(p.numel() for p in full.parameters())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == [0, 1]
        # the step-0 probe left each rank's shards as they were: same values, each a part of the model
        assert r["unchanged"] and r["same_names"] and r["training"] and all(r["no_grads"])
        assert r["numel"] < numel
        assert r["init_weights"] == weights_digest(full)  # hashed from the gathered, unsharded weights
        assert r["fsdp_forwards_in_probes"] == [0, 0]  # the probes ran the wrapped modules, not FSDP units

    records = [json.loads(x) for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]  # written once, by rank 0
    assert all(r["world_size"] == 2 and r["prompts_per_rank"] == [1, 2] for r in records)
    assert sum(r["numel"] for r in ranks) >= numel  # the shards together hold the model

    sys.path.insert(0, str(Path(__file__).parent))
    from fsdp_probe_fit import PROMPTS

    sharded = ProbeResult.load(probe_folder(tmp_path, 0))
    alone = probe(full, PROMPTS)
    assert sharded.meta["prompt_lengths"] == alone.meta["prompt_lengths"] == [5, 7, 4]
    torch.testing.assert_close(sharded.tokens, alone.tokens)
    assert_results_close(sharded, alone, atol=1e-5)


def test_lightning_refuses_fsdp_on_the_cpu():
    """Why the fit above subclasses the strategy: Lightning's FSDPStrategy itself needs a GPU accelerator."""
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)


FSDP2_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from alignscope.apps.sharded_params import full_params
from alignscope.models.tiny import tiny_model
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = tiny_model("llama")
fully_shard(model, mesh=dist.device_mesh.init_device_mesh("cpu", (1,)))
try:
    with full_params(model, model):
        pass
except RuntimeError as err:
    print(err)
dist.destroy_process_group()
"""


def test_fsdp2_parameters_are_refused_with_a_clear_error():
    import torch.distributed.fsdp

    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
    out = subprocess.run([sys.executable, "-c", FSDP2_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "parameters are DTensors" in out.stdout and "FSDPStrategy (FSDP1)" in out.stdout


def test_bypassed_units_are_put_back_even_when_the_probe_fails():
    """The units swapped out for the probe return to their parents when the probe raises."""
    from alignscope.apps.sharded_params import _units_bypassed

    class Unit(torch.nn.Module):  # stands for FullyShardedDataParallel: wraps a module as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llama")
    layers = model.model.layers
    units = [Unit(layer) for layer in layers]
    for i, unit in enumerate(units):
        layers[i] = unit
    with pytest.raises(RuntimeError, match="probe failed"), _units_bypassed(model, Unit):
        assert not any(isinstance(m, Unit) for m in model.modules())  # plain modules while open
        raise RuntimeError("probe failed")
    assert list(layers) == units

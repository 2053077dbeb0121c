"""Run by test_fsdp_probe.py: a 2-process CPU fit under Lightning's FSDPStrategy with the AlignmentMonitor.

Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` and wraps with ``device_id=None``, which FSDP
rejects on a machine without an accelerator; so the LightningModule wraps its model itself in
``configure_model`` (``device_id=cpu``, one FSDP unit per decoder layer), which Lightning then keeps, and a
subclass of the strategy passes Lightning's accelerator check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from alignscope.apps.callback import AlignmentMonitor
from test_callback import PlainLM, quiet_trainer

PROMPTS = [[5, 9, 17, 3, 44], [7, 1, 2, 90, 11, 60, 4], [100, 20, 30, 40]]


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, let through its accelerator check (an exact-type check) on the CPU."""


class FSDPLM(PlainLM):
    def configure_model(self):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        self.net = FullyShardedDataParallel(self.net, device_id=torch.device("cpu"), auto_wrap_policy=policy)


class Snapshot(pl.Callback):
    """Each rank's parameter shards, gradients and train flags at train start (before or after the monitor's
    step-0 probe, by the order of the callbacks)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.model
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.grads = [p.grad for p in model.parameters()]
        self.training = [m.training for m in model.modules()]


def count_fsdp_forwards_in_probes() -> list[int]:
    """Patch FSDP's forward and the monitor's probe: the returned list gets, per probe, how many FSDP
    forwards ran inside it (0: the probe bypassed every unit)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    counts, per_probe = [0], []
    fsdp_forward, monitor_probe = FullyShardedDataParallel.forward, AlignmentMonitor._probe

    def forward(self, *args, **kwargs):
        counts[0] += 1
        return fsdp_forward(self, *args, **kwargs)

    def probe(self, *args, **kwargs):
        start = counts[0]
        monitor_probe(self, *args, **kwargs)
        per_probe.append(counts[0] - start)

    FullyShardedDataParallel.forward, AlignmentMonitor._probe = forward, probe
    return per_probe


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fsdp_forwards = count_fsdp_forwards_in_probes()
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randint(0, 128, (16, 12), generator=g)), batch_size=4)
    monitor = AlignmentMonitor(
        every_n_steps=None, log_spaced=False, prompts=PROMPTS, dirpath=str(out), figures=False, verbose=False
    )
    before, after = Snapshot(), Snapshot()
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(),
        max_steps=1,
        callbacks=[before, monitor, after],
    )
    trainer.fit(FSDPLM(), train)
    report = {
        "steps": monitor.probed_steps,
        "numel": sum(p.numel() for p in before.params.values()),  # this rank's shards
        "unchanged": all(torch.equal(before.params[k], after.params[k]) for k in before.params),
        "same_names": list(before.params) == list(after.params),
        "no_grads": [g is None for g in after.grads],
        "training": before.training == after.training,
        "init_weights": monitor.init_weights,
        "fsdp_forwards_in_probes": fsdp_forwards,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))

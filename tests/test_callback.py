"""AlignmentMonitor inside a plain Lightning project (not alignscope's app): schedule, logging, state."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from alignscope import ProbeSettings
from alignscope.apps.callback import AlignmentMonitor, MonitorConfigError
from conftest import tiny_model


class PlainLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_model("llama").train()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.net(input_ids=ids, labels=ids).loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.net(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loaders():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 128, (64, 12), generator=g))
    return DataLoader(data, batch_size=8), DataLoader(
        TensorDataset(torch.randint(0, 128, (16, 12), generator=g))
    )


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU trainer without progress bar, model summary, sanity check, logger or checkpoints (unless given)."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_monitor_in_a_plain_lightning_project(tmp_path):
    monitor = AlignmentMonitor(
        every_n_steps=3, log_spaced=False, num_prompts=4, prompt_length=8, dirpath=str(tmp_path)
    )
    module = PlainLM()
    trainer = quiet_trainer(
        max_steps=7, logger=CSVLogger(tmp_path, name="csv", version=""), callbacks=[monitor]
    )
    train, val = loaders()
    trainer.fit(module, train, val)
    assert monitor.probed_steps == [0, 3, 6, 7]
    assert monitor.prompts.shape == (4, 8)
    assert "align/coupling/k10" in trainer.callback_metrics
    assert module.net.training  # train mode restored after every probe
    assert all(p.requires_grad for p in module.parameters())
    lines = [json.loads(x) for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 3, 6, 7]
    # step 0 is before the first optimizer step: the probe saw the initial weights
    assert lines[0]["coupling/k10"] != lines[-1]["coupling/k10"]


def test_prompts_are_fixed_and_seeded(tmp_path):
    a = AlignmentMonitor(num_prompts=3, prompt_length=5, seed=1, dirpath=str(tmp_path))
    b = AlignmentMonitor(num_prompts=3, prompt_length=5, seed=1, dirpath=str(tmp_path))
    for m in (a, b):
        trainer = quiet_trainer(max_steps=1, callbacks=[m])
        trainer.fit(PlainLM(), *loaders())
    assert torch.equal(a.prompts, b.prompts)


def test_schedule():
    m = AlignmentMonitor(every_n_steps=100, log_spaced=True)
    assert [s for s in range(300) if m.scheduled(s)] == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200]
    m = AlignmentMonitor(every_n_steps=None, log_spaced=False)
    assert [s for s in range(10) if m.scheduled(s)] == [0]
    m = AlignmentMonitor(every_n_steps=None, log_spaced=True)
    assert [s for s in range(300) if m.scheduled(s)] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(every_n_steps=0), "every_n_steps must be a positive integer"),
        (dict(num_prompts=-1), "num_prompts"),
        (dict(ks=[10, 0]), "0 is neither"),
        (dict(tokens="middle"), "tokens must be"),
        (dict(layers=[]), "layers is empty"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(probe=ProbeSettings(), ks=[4]), "either whole"),
        (dict(prompts=torch.rand(2, 3)), "prompts must be"),
        (dict(every_n_steps=None, log_spaced=False, at_end=False), "only probe step 0"),
        (dict(log_spaced="yes"), "log_spaced"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(MonitorConfigError, match=match):
        AlignmentMonitor(**kwargs)


def test_state_dict_round_trip():
    m = AlignmentMonitor(prompts=[[1, 2, 3]])
    m.history = [{"step": 0, "coupling/k10": 0.1}]
    n = AlignmentMonitor()
    n.load_state_dict(m.state_dict())
    assert n.probed_steps == [0] and torch.equal(n.prompts, torch.tensor([[1, 2, 3]]))


def test_probe_on_checkpoint_is_in_the_checkpoint_state(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitor = AlignmentMonitor(
        every_n_steps=None,
        log_spaced=False,
        on_checkpoint=True,
        num_prompts=2,
        prompt_length=6,
        dirpath=str(tmp_path),
        figures=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = quiet_trainer(max_steps=7, callbacks=[monitor, ckpt], enable_checkpointing=True)
    trainer.fit(PlainLM(), *loaders())
    assert monitor.probed_steps == [0, 3, 6, 7]
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("AlignmentMonitor")]
    assert [h["step"] for h in saved["history"]] == [0, 3]


def test_ddp_two_ranks_probe_once_and_stay_in_step(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "ddp_fit.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x)["step"] for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert lines == [0, 2, 4, 5]  # written once, by rank 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"steps": [0, 2, 4, 5], "global_step": 5}


def test_resume_under_a_strategy_that_restores_after_setup(tmp_path):
    """FSDP restores a checkpoint (callback state included) after setup, so after on_fit_start: the monitor
    sets its run folder up once the state is in, and a resumed run in a new folder brings the earlier
    probes along, with the run's weights hash."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from alignscope.apps.resumed_probes import probe_folder

    class RestoreAfterSetup(SingleDeviceStrategy):
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    train, val = loaders()
    old, new = tmp_path / "old", tmp_path / "new"
    first = AlignmentMonitor(
        every_n_steps=None, log_spaced=False, num_prompts=2, prompt_length=6, dirpath=str(old)
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=2, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        PlainLM(), train, val
    )
    assert first.probed_steps == [0, 2]
    resumed = AlignmentMonitor(
        every_n_steps=None, log_spaced=False, num_prompts=2, prompt_length=6, dirpath=str(new)
    )
    trainer = quiet_trainer(max_steps=4, callbacks=[resumed], strategy=RestoreAfterSetup(device="cpu"))
    trainer.fit(PlainLM(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # the checkpoint at step 2 was written before the end-of-fit probe of step 2: it holds the probe of step 0
    assert resumed.probed_steps == [0, 4] and resumed.init_weights == first.init_weights
    records = [json.loads(x) for x in (new / "probes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4]
    assert probe_folder(new, 0).is_dir()  # brought along from the first run's folder

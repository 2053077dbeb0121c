"""Run by test_callback.py::test_ddp_two_ranks: a 2-process CPU DDP fit with the AlignmentMonitor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from alignscope.apps.callback import AlignmentMonitor
from test_callback import PlainLM, quiet_trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randint(0, 128, (64, 12), generator=g)), batch_size=4)
    val = DataLoader(TensorDataset(torch.randint(0, 128, (16, 12), generator=g)), batch_size=4)
    monitor = AlignmentMonitor(
        every_n_steps=2,
        log_spaced=False,
        num_prompts=2,
        prompt_length=6,
        dirpath=str(out),
        figures=False,
        verbose=False,
    )
    trainer = quiet_trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, callbacks=[monitor])
    trainer.fit(PlainLM(), train, val)
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"steps": monitor.probed_steps, "global_step": trainer.global_step})
    )

"""Run by test_ddp_probe.py: a 2-process CPU DDP fit whose monitor shares its 3 prompts across the ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from alignscope.apps.callback import AlignmentMonitor
from test_callback import PlainLM, quiet_trainer

PROMPTS = [[5, 9, 17, 3, 44], [7, 1, 2, 90, 11, 60, 4], [100, 20, 30, 40]]

if __name__ == "__main__":
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randint(0, 128, (16, 12), generator=g)), batch_size=4)
    monitor = AlignmentMonitor(
        every_n_steps=None, log_spaced=False, prompts=PROMPTS, dirpath=str(out), figures=False, verbose=False
    )
    trainer = quiet_trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, callbacks=[monitor])
    trainer.fit(PlainLM(), train)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"steps": monitor.probed_steps}))

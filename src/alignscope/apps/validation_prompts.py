"""The monitor's default prompts: a seeded sample of validation sequences from a Lightning trainer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from alignscope.apps.monitor_config import MonitorConfigError


def validation_dataset(trainer: pl.Trainer) -> Any:
    """The datamodule's ``val_dataset`` (set up if needed), else the first validation loader's data set."""
    dm = trainer.datamodule
    if dm is not None:
        if hasattr(dm, "setup") and getattr(dm, "val_dataset", None) is None:
            dm.setup("fit")
        dataset = getattr(dm, "val_dataset", None)
        if dataset is not None:
            return dataset
    loaders = trainer.val_dataloaders if trainer.val_dataloaders is not None else None
    if loaders is None:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def sample_prompts(
    trainer: pl.Trainer, num_prompts: int, prompt_length: int | None, seed: int
) -> torch.Tensor:
    """``[B, T]`` token ids: ``num_prompts`` validation sequences drawn with ``seed`` (in data set order), each
    cut to its first ``prompt_length`` tokens, then all to the shortest."""
    dataset = validation_dataset(trainer)
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise MonitorConfigError(
            "AlignmentMonitor: no validation data set to sample prompts from; pass prompts=[B, T] token ids"
        )
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:num_prompts].sort().values
    rows = []
    for i in idx.tolist():
        item = dataset[i]
        if isinstance(item, dict):
            item = item["input_ids"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        row = torch.as_tensor(item).reshape(-1)
        rows.append(row[:prompt_length] if prompt_length else row)
    length = min(len(r) for r in rows)
    return torch.stack([r[:length] for r in rows]).long()

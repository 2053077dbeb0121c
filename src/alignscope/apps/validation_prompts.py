"""The monitor's prompts: a seeded sample of validation sequences from a Lightning trainer, or given texts
tokenized with the monitor's or the datamodule's tokenizer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from alignscope.apps.monitor_config import MonitorConfigError, Prompts, checked_prompts


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


def tokenize_prompts(texts: list[str], tokenizer: Any) -> Prompts:
    """Each text's ids as ``tokenizer(text)["input_ids"]`` (as ``probe(model, texts, tokenizer=...)`` does),
    not truncated: ``[B, T]`` when all have the same length, else one 1-D tensor per prompt."""
    ids = [list(tokenizer(text)["input_ids"]) for text in texts]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise MonitorConfigError(f"AlignmentMonitor: text prompts {empty} have no tokens")
    return checked_prompts(ids)


def datamodule_tokenizer(trainer: pl.Trainer) -> Any:
    """The datamodule's ``tokenizer`` attribute (prepared if it has ``prepare()`` and none yet), else None."""
    dm = trainer.datamodule
    if dm is None:
        return None
    if getattr(dm, "tokenizer", None) is None and callable(getattr(dm, "prepare", None)):
        dm.prepare()
    return getattr(dm, "tokenizer", None)


def fit_start_prompts(
    trainer: pl.Trainer,
    texts: list[str] | None,
    tokenizer: Any,
    num_prompts: int,
    prompt_length: int | None,
    seed: int,
) -> Prompts:
    """The prompts at fit start when none were given as ids: ``texts`` tokenized with ``tokenizer`` or the
    datamodule's, else :func:`sample_prompts`."""
    if texts is None:
        return sample_prompts(trainer, num_prompts, prompt_length, seed)
    tokenizer = tokenizer if tokenizer is not None else datamodule_tokenizer(trainer)
    if tokenizer is None:
        raise MonitorConfigError(
            "AlignmentMonitor: text prompts need a tokenizer, and the datamodule has none (no "
            "trainer.datamodule.tokenizer): pass AlignmentMonitor(prompts=texts, tokenizer=...) or token ids"
        )
    return tokenize_prompts(texts, tokenizer)

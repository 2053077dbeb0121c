"""``CausalLMModule``: a LightningModule that trains a Hugging Face causal LM.

AdamW (no weight decay on biases and norms), linear warm-up then cosine decay to ``min_lr_ratio * lr``,
gradient clipping through the Trainer; logs ``train/loss``, ``val/loss`` and ``val/ppl``. Checkpoints carry
the random-number generators' states (torch, CUDA, numpy, Python), restored when training resumes, so that
dropout draws after a resume are the ones an uninterrupted run makes.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

RNG_KEY = "alignscope_rng_states"
"""The checkpoint entry holding :func:`rng_states`."""


def rng_states() -> dict[str, Any]:
    """The global generators' states as plain values and tensors (loadable with ``weights_only``)."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {**np_state, "state": {**np_state["state"], "key": np_state["state"]["key"].tolist()}},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to ``states`` (from :func:`rng_states`)."""
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class CausalLMModule(pl.LightningModule):
    """Train ``model`` (a Hugging Face causal LM) on batches of token ids ``[B, T]`` (labels = inputs).

    Args:
        model: the causal LM (built from a config at random init, or pretrained).
        lr, weight_decay, betas: AdamW settings.
        warmup_steps: linear warm-up steps; then cosine decay over the remaining steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.model = model.train()  # models built for probing come in eval mode
        if getattr(model, "loss_type", "") is None:  # e.g. GPT2LMHeadModel: its name names no loss
            model.loss_type = "ForCausalLM"  # the loss transformers falls back to, stated (no warning)
        self.save_hyperparameters(ignore=["model"], logger=False)  # the apps log their whole config once
        self._val_losses: list[torch.Tensor] = []
        self._rng_states_to_restore: dict[str, Any] | None = None

    def forward(self, input_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False)

    @staticmethod
    def _ids(batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            return batch["input_ids"]
        if isinstance(batch, (list, tuple)):
            return batch[0]
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self(self._ids(batch)).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self(self._ids(batch)).loss
        self._val_losses.append(loss.detach())
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_losses:
            mean = torch.stack(self._val_losses).mean()
            self.log("val/ppl", torch.exp(mean), prog_bar=False, sync_dist=True)
        self._val_losses.clear()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # applied at train start: building the loaders and callbacks in between must not shift the streams
        self._rng_states_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

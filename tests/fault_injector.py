"""A Lightning callback that kills its own training process (SIGKILL) at a chosen point, or slows it down.

Added to an ``alignscope-train`` run by test_fault_injection_train.py with Hydra overrides such as
``+callbacks.fault._target_=fault_injector.FaultInjector +callbacks.fault.at=batch_end +callbacks.fault.step=10``
(``tests/`` on ``PYTHONPATH``). Callbacks run in the order given, after the AlignmentMonitor and before
ModelCheckpoint (which Lightning moves last).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning.pytorch as pl

POINTS = ("probe_saved", "batch_start", "batch_end", "checkpoint_dump")


def kill_self() -> None:
    """What the OOM killer or ``kill -9`` does: no handler, no cleanup, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector(pl.Callback):
    """SIGKILL this process at ``at`` when ``trainer.global_step == step``; sleep ``sleep_s`` after each batch.

    Points: ``probe_saved`` (the probe of ``step`` is in ``probes/`` but not yet in ``probes.jsonl``),
    ``batch_start`` (before the batch that makes step ``step + 1``; the checkpoint of ``step`` is written),
    ``batch_end`` (after the monitor's hook of ``step``, before its checkpoint), ``checkpoint_dump`` (the
    checkpoint of ``step`` is being assembled, its file not yet written).
    """

    def __init__(self, at: str | None = None, step: int = 0, sleep_s: float = 0.0) -> None:
        if at is not None and at not in POINTS:
            raise ValueError(f"FaultInjector: at must be one of {POINTS} or null, got {at!r}")
        self.at = at
        self.step = step
        self.sleep_s = sleep_s

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.at != "probe_saved":
            return
        from alignscope.probing.result import ProbeResult

        original = ProbeResult.save

        def save_then_die(result: ProbeResult, path: Any) -> Any:
            out = original(result, path)
            if trainer.global_step == self.step:
                kill_self()
            return out

        ProbeResult.save = save_then_die

    def _kill_at(self, point: str, trainer: pl.Trainer) -> None:
        if self.at == point and trainer.global_step == self.step:
            kill_self()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._kill_at("batch_start", trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._kill_at("batch_end", trainer)
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def on_save_checkpoint(self, trainer: pl.Trainer, *args: Any) -> None:
        self._kill_at("checkpoint_dump", trainer)

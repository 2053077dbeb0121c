"""``AlignmentMonitor``: a Lightning callback that probes the model during training (any Lightning project).

Probes at step 0 before the first optimizer step (the random-init point), at log-spaced steps
(1, 2, 4, 8, ... up to ``every_n_steps``) when asked, every ``every_n_steps`` steps, when a checkpoint is saved (option), and at the
end of fit. The prompts are a fixed, seeded sample of validation sequences, the same at every probe.
Every probe goes to disk as soon as it is computed (``probes/step_<N>/`` and one line of ``probes.jsonl``),
every scalar is logged to all the trainer's loggers at ``trainer.global_step``; when validation runs at a
probed step, its ``val/loss`` joins that probe's record. At the end of fit ``summary.json`` and figures are
written to the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from alignscope.apps.logs import log_block
from alignscope.apps.monitor_config import (
    MonitorConfigError,
    checked_prompts,
    monitor_settings,
    positive_int,
    prompt_lists,
    text_prompts,
    true_or_false,
)
from alignscope.apps.monitor_figures import load_probe, load_probes, recorded_losses, write_monitor_figures
from alignscope.apps.monitor_summary import format_summary, probe_line, summarize
from alignscope.apps.monitor_wandb import (
    log_artifact,
    log_images,
    log_metrics,
    log_probe_figures,
    log_summary,
)
from alignscope.apps.problems import announce_problems
from alignscope.apps.resumed_probes import bring_probes_along, probe_folder
from alignscope.apps.run_folder import (
    RunFolder,
    append_record,
    package_version,
    text_digest,
    weights_digest,
    write_json,
    write_records,
)
from alignscope.apps.sharded_params import full_params, is_sharded, refuse_dtensor_parameters, unwrapped
from alignscope.apps.shared_probe import shared_probe
from alignscope.apps.validation_prompts import fit_start_prompts, tokenize_prompts
from alignscope.core.randomized import RandomizedSVD
from alignscope.probing.result import HEADLINE, ProbeResult
from alignscope.probing.settings import ProbeSettings

log = logging.getLogger(__name__)

__all__ = ["MONITOR_RESULTS", "AlignmentMonitor", "MonitorConfigError", "format_summary"]

MONITOR_RESULTS = ("probes", "probes.jsonl", "summary.json", "figures")
"""The monitor's entries in its run folder."""
VAL_LOSS = "val/loss"
"""The validation loss (the LightningModule's logged name), added to the record of a probe taken at a step
where validation also ran."""
CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype")
"""Model-config keys left out of the monitor's fingerprint: they name or annotate, they do not set numbers."""


class AlignmentMonitor(pl.Callback):
    """Probe residual-Jacobian metrics on a schedule and log them as trajectories over training steps.

    Args:
        every_n_steps: probe every N optimizer steps (None: only the other triggers).
        log_spaced: also probe at steps 1, 2, 4, 8, ... below ``every_n_steps`` (early training is where
            things change; later the regular cadence takes over).
        prompts: ``[B, T]`` token ids (or id lists of any lengths) to probe, or texts (a list of strings,
            tokenized with ``tokenizer``, else with the datamodule's ``tokenizer`` at fit start, as
            ``probe(model, texts, tokenizer=...)`` does, not truncated); default: ``num_prompts`` validation
            sequences, seeded.
        num_prompts, prompt_length, seed: the default prompt sample (``prompt_length`` first tokens of each).
        probe: every probe setting at once (:class:`alignscope.ProbeSettings`, what ``conf/probe`` builds).
        layers, tokens, ks, chunk_size, engine: the same settings one by one (when ``probe`` is not given).
        on_checkpoint: also probe whenever a checkpoint is saved.
        at_end: probe at the end of fit.
        dirpath: run folder for ``probes/``, ``probes.jsonl``, ``figures/``, ``summary.json``
            (default: the trainer's ``log_dir`` or ``default_root_dir``).
        figures: write figures at the end of fit (PNG, and ``wandb.Image`` to W&B loggers), and log each
            probe's figures to W&B loggers at its step.
        run_name: the run's name in the figures' titles (default: the run folder's name).
        prefix: prefix of logged names, e.g. ``align/coupling/k10``.
        model_attr: attribute of the LightningModule holding the Hugging Face model (default: found).
        tokenizer: tokenizes text ``prompts`` (default: ``trainer.datamodule.tokenizer``).
        verbose: log a line per probe (step, seconds, headline numbers) and the summary table at the end of
            fit, and show a bar within each probe while Lightning shows its progress bar.
        overwrite: the run folder holds probes of other settings (another model, init, prompts or probe
            settings, see :mod:`alignscope.apps.run_folder`): clear it instead of refusing to start.

    The run folder is locked while fit runs (a second process writing to it fails at once) and records a
    fingerprint (model config, the hash of the weights at the first probe, prompts, probe settings,
    package version). A resume from a checkpoint of another folder brings that folder's probes along.
    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        log_spaced: bool = True,
        prompts: torch.Tensor | Sequence[Sequence[int]] | Sequence[str] | None = None,
        num_prompts: int = 8,
        prompt_length: int | None = 64,
        seed: int = 0,
        probe: ProbeSettings | None = None,
        layers: Sequence[int] | None = None,
        tokens: str | Sequence[int] = "last",
        ks: Sequence[int] | str = "auto",
        chunk_size: int | None = None,
        engine: str | RandomizedSVD = "auto",
        on_checkpoint: bool = False,
        at_end: bool = True,
        dirpath: str | None = None,
        figures: bool = True,
        run_name: str | None = None,
        prefix: str = "align/",
        model_attr: str | None = None,
        verbose: bool = True,
        overwrite: bool = False,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        positive_int("every_n_steps", every_n_steps, allow_none=True)
        positive_int("num_prompts", num_prompts)
        positive_int("prompt_length", prompt_length, allow_none=True)
        true_or_false("log_spaced", log_spaced)
        self.settings = monitor_settings(probe, layers, tokens, ks, chunk_size, engine)
        self.texts = text_prompts(prompts)
        self.tokenizer = tokenizer
        if self.texts is None:
            self.prompts = checked_prompts(prompts)
        else:
            self.prompts = tokenize_prompts(self.texts, tokenizer) if tokenizer is not None else None
        true_or_false("overwrite", overwrite)
        if not (every_n_steps or log_spaced or on_checkpoint or at_end):
            raise MonitorConfigError(
                "AlignmentMonitor would only probe step 0: set every_n_steps, log_spaced, on_checkpoint or at_end"
            )
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.num_prompts = num_prompts
        self.prompt_length = prompt_length
        self.seed = seed
        self.on_checkpoint = on_checkpoint
        self.at_end = at_end
        self.dirpath = dirpath
        self.figures = figures
        self.prefix = prefix
        self.model_attr = model_attr
        self.verbose = verbose
        self.overwrite = overwrite
        self.run_name = run_name
        self.history: list[dict[str, float]] = []
        self.init_weights: str | None = None
        self.source_dir: str | None = None
        self._folder: RunFolder | None = None
        self._started = False  # the fit's prompts, weights hash and run folder are set up
        self.seconds = 0.0
        self.val_losses: list[dict[str, float]] = []  # {"step", "val/loss"} at each validation (checkpointed)
        self._first: ProbeResult | None = None
        self._latest: ProbeResult | None = None

    # ----------------------------------------------------------------- schedule and state
    def scheduled(self, step: int) -> bool:
        """Whether ``step`` is on the probe schedule (checkpoint and end-of-fit probes come on top)."""
        if step == 0:
            return True
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        early = not self.every_n_steps or step < self.every_n_steps
        return self.log_spaced and early and step & (step - 1) == 0

    @property
    def probed_steps(self) -> list[int]:
        return [int(h["step"]) for h in self.history]

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "prompts": prompt_lists(self.prompts) if self.prompts is not None else None,
            "seconds": self.seconds,
            "init_weights_sha256": self.init_weights,
            "run_dir": self.source_dir,
            "val_losses": self.val_losses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        if state_dict.get("prompts") is not None:
            self.prompts = checked_prompts(state_dict["prompts"])
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.init_weights = state_dict.get("init_weights_sha256")
        self.source_dir = state_dict.get("run_dir")
        self.val_losses = list(state_dict.get("val_losses", []))

    # ----------------------------------------------------------------- lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)  # fail early if there is no Hugging Face model
        # on every rank, before any collective
        refuse_dtensor_parameters(trainer.model if trainer.model is not None else model)
        self._started = False
        # strategies that restore a checkpoint after setup (FSDP) hand this callback its saved state only after
        # on_fit_start: the run folder is then set up once the state is in (first train start or probe)
        if not trainer.strategy.restore_checkpoint_after_setup:
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prompts, the weights hash and (rank 0) the run folder, once per fit, with the restored state of a
        resumed run in place; a collective under FSDP (every rank calls it at the same hook)."""
        if self._started:
            return
        self._started = True
        model = self._model(pl_module)
        if self.prompts is None:
            self.prompts = fit_start_prompts(
                trainer, self.texts, self.tokenizer, self.num_prompts, self.prompt_length, self.seed
            )
        # a fresh run hashes its weights (a resume restores the hash from the checkpoint); under FSDP every
        # rank gathers the full parameters for it (a collective), otherwise rank 0 alone hashes
        if self.init_weights is None and (trainer.is_global_zero or is_sharded(trainer.model)):
            with full_params(trainer.model, model) as full:
                self.init_weights = weights_digest(full)
        if trainer.is_global_zero:  # only rank 0 writes the folder (and saves the checkpoint's state)
            run_dir = self._run_dir(trainer)
            self._folder = RunFolder(
                run_dir, MONITOR_RESULTS, app="AlignmentMonitor", overwrite_hint="overwrite=True"
            )
            self._folder.__enter__()
            self._folder.claim(self.fingerprint(model), overwrite=self.overwrite)
            bring_probes_along(self.history, self.source_dir, run_dir)
            self.source_dir = str(run_dir.resolve())
            write_records(run_dir / "probes.jsonl", [h for h in self.history if len(h) > 1])

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        """What sets the monitor's numbers: model class and config, weights at the first probe, prompts, probe
        settings, package version (see :mod:`alignscope.apps.run_folder`)."""
        model = unwrapped(model)  # the model class, not an FSDP wrapper's
        config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_KEYS_IGNORED}
        config = {k: v for k, v in config.items() if not k.startswith("alignscope_")}
        return {
            "app": "AlignmentMonitor",
            "alignscope_version": package_version(),
            "model": {"class": type(model).__name__, "config": config},
            "init_weights_sha256": self.init_weights,
            "prompts_sha256": text_digest(prompt_lists(self.prompts)),
            "probe": self.settings.fingerprint(),
        }

    def _release(self) -> None:
        if self._folder is not None:
            self._folder.release()
            self._folder = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)
        if self.scheduled(trainer.global_step):
            self._maybe_probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.scheduled(trainer.global_step):
            self._maybe_probe(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get(VAL_LOSS)
        if trainer.sanity_checking or loss is None:
            return
        self.val_losses.append({"step": trainer.global_step, VAL_LOSS: float(loss)})
        # Lightning validates after the step's train-batch hook: a probe of this step is already recorded
        last = self.history[-1] if self.history else {}
        if trainer.is_global_zero and last.get("step") == trainer.global_step and len(last) > 1:
            last[VAL_LOSS] = float(loss)
            write_records(self._run_dir(trainer) / "probes.jsonl", [h for h in self.history if len(h) > 1])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if self.on_checkpoint and trainer.global_step not in self.probed_steps:
            self._maybe_probe(trainer, pl_module)
            # the checkpoint's callback state was taken before this hook: refresh it
            for key in list(checkpoint.get("callbacks", {})):
                if key == self.state_key:
                    checkpoint["callbacks"][key] = self.state_dict()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)  # no train start when no step is taken
        # also runs when no training step is taken (max_steps=0: load and probe only)
        if self.at_end or not self.history:
            self._maybe_probe(trainer, pl_module)
        if trainer.is_global_zero and self.history:
            self._finish(trainer)
        trainer.strategy.barrier("alignment_monitor_end")

    # ----------------------------------------------------------------- probing
    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)
        step = trainer.global_step
        if step in self.probed_steps:
            return
        self._probe(trainer, pl_module, step)  # every rank probes its share of the prompts
        trainer.strategy.barrier("alignment_monitor")

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        start = time.perf_counter()
        model = self._model(pl_module)
        # a bar within the probe, under Lightning's (rank 0 only); cleared when done
        progress = self.settings.progress or (
            self.verbose and trainer.progress_bar_callback is not None and trainer.is_global_zero
        )
        settings = replace(self.settings, progress=progress)
        ranks = trainer.world_size
        # under FSDP every rank gathers the full parameters for the probe and frees them after it
        with full_params(trainer.model, model) as full:
            result = shared_probe(full, prompt_lists(self.prompts), settings, trainer.global_rank, ranks)
        if result is None:  # not rank 0: its share went to rank 0, which writes
            self.history.append({"step": step})  # keep the schedule in step on other ranks
            return
        result.meta["step"] = step
        scalars = result.scalars()
        run_dir = self._run_dir(trainer)
        result.save(probe_folder(run_dir, step))
        # the train loss of this step (the validation loss is kept apart: a resumed run cannot redo a
        # validation that ran after its checkpoint, so a stale value would differ from the uninterrupted run)
        entry = {"step": step, **scalars, **recorded_losses(trainer.callback_metrics, ("train/loss",))}
        if ranks > 1:
            entry.update(world_size=ranks, prompts_per_rank=result.meta["prompts_per_rank"])
        append_record(run_dir / "probes.jsonl", entry)
        self.history.append(entry)
        if self._first is None and step == self.history[0]["step"]:
            self._first = result
        self._latest = result
        metrics = {f"{self.prefix}{k}": v for k, v in scalars.items()}
        metrics[f"{self.prefix}probe_seconds"] = time.perf_counter() - start
        log_metrics(trainer.loggers, metrics, step)
        if self.figures:
            log_probe_figures(trainer.loggers, result, self.prefix, step)
        for name in HEADLINE:
            if name in scalars:
                trainer.callback_metrics[f"{self.prefix}{name}"] = torch.tensor(scalars[name])
        self.seconds += time.perf_counter() - start
        if self.verbose:
            log.info("%s", probe_line(step, metrics[f"{self.prefix}probe_seconds"], scalars))

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is not None:
            model = getattr(pl_module, self.model_attr, None)
            if model is None:
                raise MonitorConfigError(
                    f"AlignmentMonitor: the LightningModule has no attribute {self.model_attr!r}"
                )
            return model
        for module in [pl_module, *pl_module.children()]:
            if hasattr(getattr(module, "config", None), "model_type"):
                return module
        raise MonitorConfigError(
            "AlignmentMonitor: no Hugging Face model found on the LightningModule; pass model_attr='<attribute>'"
        )

    # ----------------------------------------------------------------- files and summary
    def _run_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def summary(self) -> dict[str, Any]:
        """Init (first probe) and final (latest probe) value of each headline metric, and their change."""
        return summarize(self.history, self.seconds)

    def _finish(self, trainer: pl.Trainer) -> None:
        run_dir = self._run_dir(trainer)
        write_json(run_dir / "summary.json", self.summary())  # the numbers first, figures after
        start = time.perf_counter()
        if self.figures:
            self._figures(trainer, run_dir)
        self.seconds += time.perf_counter() - start
        summary = self.summary()
        write_json(run_dir / "summary.json", summary)
        log_summary(trainer.loggers, summary, self.prefix)
        files = ("probes", "probes.jsonl", "summary.json")
        log_artifact(trainer.loggers, {name: run_dir / name for name in files}, "probes")
        if self.verbose:
            log_block(log, "alignment monitor summary:", format_summary(summary))
        if self._latest is not None:
            announce_problems(self._latest, self.history[-1], f"the probe at step {self.history[-1]['step']}")

    def _figures(self, trainer: pl.Trainer, run_dir: Path) -> None:
        first = self._first or load_probe(run_dir, int(self.history[0]["step"]))
        latest = self._latest or load_probe(run_dir, int(self.history[-1]["step"]))
        probes = load_probes(run_dir, self.probed_steps)
        name, max_steps = self.run_name or run_dir.name, trainer.max_steps
        paths = write_monitor_figures(
            self.history,
            latest.ks,
            first,
            latest,
            run_dir / "figures",
            probes,
            name,
            max_steps,
            self.val_losses,
        )
        log_images(trainer.loggers, paths, f"{self.prefix}final_figures/", int(self.history[-1]["step"]))

"""``AlignmentMonitor``: a Lightning callback that probes the model during training (any Lightning project).

Probes at step 0 before the first optimizer step (the random-init point), at log-spaced steps
(1, 2, 4, 8, ... up to ``every_n_steps``) when asked, every ``every_n_steps`` steps, when a checkpoint is saved (option), and at the
end of fit. The prompts are a fixed, seeded sample of validation sequences, the same at every probe.
Every probe goes to disk as soon as it is computed (``probes/step_<N>/`` and one line of ``probes.jsonl``),
every scalar is logged to all the trainer's loggers at ``trainer.global_step``, and at the end of fit
``summary.json`` and figures are written to the run folder.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from alignscope.apps.problems import announce_problems
from alignscope.apps.run_folder import (
    RunFolder,
    append_record,
    package_version,
    text_digest,
    weights_digest,
    write_json,
    write_records,
)
from alignscope.core.randomized import RandomizedSVD
from alignscope.probing.result import HEADLINE, ProbeResult
from alignscope.probing.settings import ProbeSettings, ProbeSettingsError

MONITOR_RESULTS = ("probes", "probes.jsonl", "summary.json", "figures")
"""The monitor's entries in its run folder."""
CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype")
"""Model-config keys left out of the monitor's fingerprint: they name or annotate, they do not set numbers."""


class MonitorConfigError(ValueError):
    """An AlignmentMonitor argument that cannot work; the message says what to change."""


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MonitorConfigError(f"AlignmentMonitor: {name} must be a positive integer, got {value!r}")


class AlignmentMonitor(pl.Callback):
    """Probe residual-Jacobian metrics on a schedule and log them as trajectories over training steps.

    Args:
        every_n_steps: probe every N optimizer steps (None: only the other triggers).
        log_spaced: also probe at steps 1, 2, 4, 8, ... below ``every_n_steps`` (early training is where
            things change; later the regular cadence takes over).
        prompts: ``[B, T]`` token ids to probe; default: ``num_prompts`` validation sequences, seeded.
        num_prompts, prompt_length, seed: the default prompt sample (``prompt_length`` first tokens of each).
        probe: every probe setting at once (:class:`alignscope.ProbeSettings`, what ``conf/probe`` builds).
        layers, tokens, ks, chunk_size, engine: the same settings one by one (when ``probe`` is not given).
        on_checkpoint: also probe whenever a checkpoint is saved.
        at_end: probe at the end of fit.
        dirpath: run folder for ``probes/``, ``probes.jsonl``, ``figures/``, ``summary.json``
            (default: the trainer's ``log_dir`` or ``default_root_dir``).
        figures: write figures at the end of fit (PNG, and ``wandb.Image`` to W&B loggers).
        prefix: prefix of logged names, e.g. ``align/coupling/k10``.
        model_attr: attribute of the LightningModule holding the Hugging Face model (default: found).
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
        prompts: torch.Tensor | Sequence[Sequence[int]] | None = None,
        num_prompts: int = 8,
        prompt_length: int | None = 64,
        seed: int = 0,
        probe: ProbeSettings | None = None,
        layers: Sequence[int] | None = None,
        tokens: str | Sequence[int] = "last",
        ks: Sequence[int] = (10, 30, 50),
        chunk_size: int | None = None,
        engine: str | RandomizedSVD = "auto",
        on_checkpoint: bool = False,
        at_end: bool = True,
        dirpath: str | None = None,
        figures: bool = True,
        prefix: str = "align/",
        model_attr: str | None = None,
        verbose: bool = True,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        _positive_int("every_n_steps", every_n_steps, allow_none=True)
        _positive_int("num_prompts", num_prompts)
        _positive_int("prompt_length", prompt_length, allow_none=True)
        if not isinstance(log_spaced, bool):
            raise MonitorConfigError(
                f"AlignmentMonitor: log_spaced must be true or false, got {log_spaced!r}"
            )
        try:
            given = ProbeSettings(layers=layers, tokens=tokens, ks=ks, chunk_size=chunk_size, engine=engine)
        except ProbeSettingsError as err:
            raise MonitorConfigError(f"AlignmentMonitor: {err}") from None
        if probe is not None:
            if not isinstance(probe, ProbeSettings):
                raise MonitorConfigError(
                    f"AlignmentMonitor: probe must be an alignscope.ProbeSettings, got {type(probe).__name__}"
                )
            if given != ProbeSettings():
                raise MonitorConfigError(
                    "AlignmentMonitor: give the probe settings either whole (probe=ProbeSettings(...)) or as "
                    "arguments (layers, tokens, ks, chunk_size, engine), not both"
                )
        self.settings = probe if probe is not None else given
        if prompts is not None:
            prompts = torch.as_tensor(prompts)
            if prompts.ndim != 2 or prompts.numel() == 0 or prompts.dtype.is_floating_point:
                raise MonitorConfigError(
                    "AlignmentMonitor: prompts must be a non-empty [B, T] tensor of token ids"
                )
        if not isinstance(overwrite, bool):
            raise MonitorConfigError(f"AlignmentMonitor: overwrite must be true or false, got {overwrite!r}")
        if not (every_n_steps or log_spaced or on_checkpoint or at_end):
            raise MonitorConfigError(
                "AlignmentMonitor would only probe step 0: set every_n_steps, log_spaced, on_checkpoint or at_end"
            )
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.prompts = prompts.long() if prompts is not None else None
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
        self.history: list[dict[str, float]] = []
        self.init_weights: str | None = None
        self.source_dir: str | None = None
        self._folder: RunFolder | None = None
        self.seconds = 0.0
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
            "prompts": self.prompts.tolist() if self.prompts is not None else None,
            "seconds": self.seconds,
            "init_weights_sha256": self.init_weights,
            "run_dir": self.source_dir,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        if state_dict.get("prompts") is not None:
            self.prompts = torch.tensor(state_dict["prompts"], dtype=torch.long)
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.init_weights = state_dict.get("init_weights_sha256")
        self.source_dir = state_dict.get("run_dir")

    # ----------------------------------------------------------------- lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)  # fail early if there is no Hugging Face model
        if self.prompts is None:
            self.prompts = self._sample_prompts(trainer)
        if self.init_weights is None:  # a fresh run (a resume restores the hash from the checkpoint)
            self.init_weights = weights_digest(model)
        if trainer.is_global_zero:
            run_dir = self._run_dir(trainer)
            self._folder = RunFolder(
                run_dir, MONITOR_RESULTS, app="AlignmentMonitor", overwrite_hint="overwrite=True"
            )
            self._folder.__enter__()
            self._folder.claim(self.fingerprint(model), overwrite=self.overwrite)
            self._bring_probes_along(run_dir)
            self.source_dir = str(run_dir.resolve())
            write_records(run_dir / "probes.jsonl", [h for h in self.history if len(h) > 1])

    def fingerprint(self, model: nn.Module) -> dict[str, Any]:
        """What sets the monitor's numbers: model class and config, weights at the first probe, prompts, probe
        settings, package version (see :mod:`alignscope.apps.run_folder`)."""
        config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_KEYS_IGNORED}
        config = {k: v for k, v in config.items() if not k.startswith("alignscope_")}
        return {
            "app": "AlignmentMonitor",
            "alignscope_version": package_version(),
            "model": {"class": type(model).__name__, "config": config},
            "init_weights_sha256": self.init_weights,
            "prompts_sha256": text_digest(self.prompts.tolist()),
            "probe": {k: v for k, v in self.settings.record().items() if k != "progress"},
        }

    def _bring_probes_along(self, run_dir: Path) -> None:
        """After a resume from another folder's checkpoint, copy that folder's probes of the restored steps."""
        if not self.history or self.source_dir is None or Path(self.source_dir) == run_dir.resolve():
            return
        source = Path(self.source_dir) / "probes"
        steps = [int(h["step"]) for h in self.history if len(h) > 1]
        missing = [s for s in steps if not (run_dir / "probes" / f"step_{s:07d}").is_dir()]
        copied = []
        for step in missing:
            folder = source / f"step_{step:07d}"
            if folder.is_dir():
                shutil.copytree(folder, run_dir / "probes" / f"step_{step:07d}")
                copied.append(step)
        lost = sorted(set(missing) - set(copied))
        note = f"resumed from a checkpoint of {self.source_dir}: copied {len(copied)} earlier probe(s)"
        if lost:
            note += (
                f"; the tensors of step(s) {lost} are not there any more, so probes.jsonl keeps their scalars "
                "but figures that need tensors start at the resume step"
            )
        print(f"alignscope: {note}", file=sys.stderr, flush=True)

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
        if self.scheduled(trainer.global_step):
            self._maybe_probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.scheduled(trainer.global_step):
            self._maybe_probe(trainer, pl_module)

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
        # also runs when no training step is taken (max_steps=0: load and probe only)
        if self.at_end or not self.history:
            self._maybe_probe(trainer, pl_module)
        if trainer.is_global_zero and self.history:
            self._finish(trainer)
        trainer.strategy.barrier("alignment_monitor_end")

    # ----------------------------------------------------------------- probing
    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step in self.probed_steps:
            return
        if trainer.is_global_zero:
            self._probe(trainer, pl_module, step)
        else:
            self.history.append({"step": step})  # keep the schedule in step on other ranks
        trainer.strategy.barrier("alignment_monitor")

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        from alignscope.probing.probe import probe

        start = time.perf_counter()
        model = self._model(pl_module)
        result = probe(model, self.prompts, settings=self.settings)
        result.meta["step"] = step
        scalars = result.scalars()
        run_dir = self._run_dir(trainer)
        result.save(run_dir / "probes" / f"step_{step:07d}")
        entry = {"step": step, **scalars}
        append_record(run_dir / "probes.jsonl", entry)
        self.history.append(entry)
        if self._first is None and step == self.history[0]["step"]:
            self._first = result
        self._latest = result
        metrics = {f"{self.prefix}{k}": v for k, v in scalars.items()}
        metrics[f"{self.prefix}probe_seconds"] = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for name in HEADLINE:
            if name in scalars:
                trainer.callback_metrics[f"{self.prefix}{name}"] = torch.tensor(scalars[name])
        self.seconds += time.perf_counter() - start

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

    def _sample_prompts(self, trainer: pl.Trainer) -> torch.Tensor:
        dataset = None
        dm = trainer.datamodule
        if dm is not None:
            if hasattr(dm, "setup") and getattr(dm, "val_dataset", None) is None:
                dm.setup("fit")
            dataset = getattr(dm, "val_dataset", None)
        if dataset is None:
            loaders = trainer.val_dataloaders if trainer.val_dataloaders is not None else None
            if loaders is None:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise MonitorConfigError(
                "AlignmentMonitor: no validation data set to sample prompts from; pass prompts=[B, T] token ids"
            )
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(dataset), generator=g)[: self.num_prompts].sort().values
        rows = []
        for i in idx.tolist():
            item = dataset[i]
            if isinstance(item, dict):
                item = item["input_ids"]
            elif isinstance(item, (tuple, list)):
                item = item[0]
            row = torch.as_tensor(item).reshape(-1)
            rows.append(row[: self.prompt_length] if self.prompt_length else row)
        length = min(len(r) for r in rows)
        return torch.stack([r[:length] for r in rows]).long()

    # ----------------------------------------------------------------- files and summary
    def _run_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def summary(self) -> dict[str, Any]:
        """Init (first probe) and final (latest probe) value of each headline metric, and their change."""
        first, last = self.history[0], self.history[-1]
        out: dict[str, Any] = {
            "init_step": first["step"],
            "final_step": last["step"],
            "monitor_seconds": self.seconds,
        }
        for name in HEADLINE:
            if name in first and name in last:
                a, b = first[name], last[name]
                out[name] = {"init": a, "final": b, "change": b - a}
        return out

    def _finish(self, trainer: pl.Trainer) -> None:
        run_dir = self._run_dir(trainer)
        write_json(run_dir / "summary.json", self.summary())  # the numbers first, figures after
        start = time.perf_counter()
        if self.figures:
            self._figures(trainer, run_dir)
        self.seconds += time.perf_counter() - start
        summary = self.summary()
        write_json(run_dir / "summary.json", summary)
        if self.verbose:
            rank_zero_only(print)(format_summary(summary), flush=True)
        if self._latest is not None:
            announce_problems(self._latest, self.history[-1], f"the probe at step {self.history[-1]['step']}")

    def _figures(self, trainer: pl.Trainer, run_dir: Path) -> None:
        from alignscope.apps import plots

        first = self._first or self._load_probe(run_dir, int(self.history[0]["step"]))
        latest = self._latest or self._load_probe(run_dir, int(self.history[-1]["step"]))
        builders: dict[str, Any] = {}
        if first is not None and latest is not None:
            pair = {
                f"step {first.meta.get('step', 0)}": first,
                f"step {latest.meta.get('step', '?')}": latest,
            }
            for k in self.settings.ks:
                builders[f"coupling_k{k}"] = partial(plots.coupling_heatmaps, pair, k)
            builders["trajectories_pca"] = partial(plots.trajectory_pca, pair)
        names = [
            n
            for n in HEADLINE
            if n.split("/")[0] != "coupling" or n.endswith(tuple(f"k{k}" for k in self.settings.ks))
        ]
        history = [h for h in self.history if len(h) > 1]
        builders["metrics_vs_step"] = partial(plots.metrics_vs_step, history, names)
        paths = plots.save_all(builders, run_dir / "figures")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                step = int(self.history[-1]["step"])
                for key, path in paths.items():
                    logger.log_image(key=f"{self.prefix}figures/{key}", images=[str(path)], step=step)

    @staticmethod
    def _load_probe(run_dir: Path, step: int) -> ProbeResult | None:
        folder = run_dir / "probes" / f"step_{step:07d}"
        return ProbeResult.load(folder) if folder.is_dir() else None


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short text table."""
    init, final = summary["init_step"], summary["final_step"]
    rows = [(k, v) for k, v in summary.items() if isinstance(v, dict)]
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  {'step ' + str(init):>12}  {'step ' + str(final):>12}  {'change':>9}"]
    for name, v in rows:
        lines.append(
            f"{name:<{width}}  {_fmt(v['init']):>12}  {_fmt(v['final']):>12}  {_fmt(v['change'], sign=True):>9}"
        )
    lines.append(f"(alignment monitor: {summary['monitor_seconds']:.1f} s in probes)")
    return "\n".join(lines)


def _fmt(x: float, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:+.4f}" if sign else f"{x:.4f}"

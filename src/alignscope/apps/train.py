"""``alignscope-train`` (also ``python -m alignscope.apps.train``): train a causal LM with the AlignmentMonitor.

Hydra app over ``conf/train.yaml``; every object is built from its config group with ``_target_``. Bad
settings fail before any training step, and every W&B run is finished, also when training fails.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from alignscope.apps import loggers as app_loggers
from alignscope.apps import sweeps
from alignscope.apps.app_help import register_help_resolver
from alignscope.apps.config import config_dir
from alignscope.apps.logs import setup_app_logging
from alignscope.apps.runtime import build, probe_settings

log = logging.getLogger(__name__)

APP = "alignscope-train"

LOGGER_CALLBACKS = ("LearningRateMonitor", "DeviceStatsMonitor")
"""Lightning callbacks that refuse to run without a logger (class names)."""


class TrainConfigError(ValueError):
    """A training setting that cannot work; the message says what to change."""


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group's loggers, named and grouped as in :mod:`alignscope.apps.loggers`."""
    return app_loggers.build_loggers(cfg, default_name=f"{cfg.model.name}-s{cfg.seed}")


def build_callbacks(cfg: DictConfig) -> list[Any]:
    return [build(spec) for spec in (cfg.get("callbacks") or {}).values() if spec is not None]


def without_logger_callbacks(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """``callbacks`` less those that need a logger (:data:`LOGGER_CALLBACKS`) when there is none."""
    if loggers:
        return callbacks
    dropped = [cb for cb in callbacks if type(cb).__name__ in LOGGER_CALLBACKS]
    if dropped:
        names = ", ".join(type(cb).__name__ for cb in dropped)
        log.info("no logger (logger=none or WANDB_MODE=disabled): leaving out %s", names)
    return [cb for cb in callbacks if cb not in dropped]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, loggers and callbacks from ``cfg``; fit; return final metrics."""
    import lightning.pytorch as pl

    from alignscope.apps.lm import CausalLMModule
    from alignscope.models import context_length

    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # 1. validate everything that can be validated before any heavy work
    probe_settings(cfg.probe)
    callbacks = build_callbacks(cfg)  # AlignmentMonitor validates its arguments here
    datamodule = build(cfg.data)
    datamodule.prepare()  # tokenizer and packed data (cached); empty-corpus errors surface here
    tok = datamodule.tokenizer
    model = build(cfg.model)(
        vocab_size=len(tok),
        token_ids={"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": None},
    )
    limit = context_length(model)
    if limit is not None and datamodule.seq_len > limit:
        raise TrainConfigError(
            f"data.seq_len={datamodule.seq_len} is beyond the model's context of {limit} positions: "
            f"lower data.seq_len or raise the model's position limit (e.g. model.config.n_positions)"
        )
    if sweeps.should_skip(run_dir, APP, cfg, sweeps.training_done(run_dir, cfg.trainer.max_steps, model)):
        return json.loads((run_dir / "metrics.json").read_text())  # a rerun sweep: nothing to do
    sweeps.unmark(run_dir)
    module = CausalLMModule(model, **OmegaConf.to_container(cfg.optim, resolve=True))
    loggers = build_loggers(cfg)
    try:
        config = {"app": APP, **OmegaConf.to_container(cfg, resolve=True)}
        config |= {
            "init": cfg.model.init,
            "data/unigram_loss": datamodule.unigram_loss,
            "data/vocab_size": len(tok),
        }
        app_loggers.start(loggers, config)
        trainer = build(
            cfg.trainer,
            logger=loggers or False,
            callbacks=without_logger_callbacks(callbacks, loggers),
            default_root_dir=str(run_dir),
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        final["data/unigram_loss"] = datamodule.unigram_loss
        final["global_step"] = trainer.global_step
        (run_dir / "metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        if "val/loss" in final:
            log.info(
                "val/loss %.3f nats/token after %d steps (unigram baseline %.3f); run folder: %s",
                final["val/loss"],
                trainer.global_step,
                datamodule.unigram_loss,
                run_dir,
            )
        app_loggers.finish(loggers, exit_code=0)
        sweeps.mark_complete(run_dir, APP, cfg)
        return final
    except BaseException:
        app_loggers.finish(loggers, exit_code=1)
        raise


register_help_resolver()
sweeps.register_gpu_resolver()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    setup_app_logging(lightning=True)
    sweeps.assign_gpu()  # before anything initializes CUDA
    train(cfg)


if __name__ == "__main__":
    main()

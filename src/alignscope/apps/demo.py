"""``alignscope-demo``: probe a tiny random-init model offline, print its headline metrics, save the result.

The run folder (``outputs/demo/<date>/<time>/``) receives ``probe/`` (tensors + JSON) and ``scalars.json``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from alignscope.apps.app_help import register_help_resolver
from alignscope.apps.config import config_dir
from alignscope.apps.logs import log_block, setup_app_logging
from alignscope.apps.runtime import build, probe_settings
from alignscope.probing.result import format_scalars

log = logging.getLogger(__name__)


register_help_resolver()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="demo")
def main(cfg: DictConfig) -> None:
    setup_app_logging()
    from pathlib import Path

    import torch
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    model = build(cfg.model)(vocab_size=cfg.prompts.vocab_size)
    g = torch.Generator().manual_seed(cfg.prompts.seed)
    ids = torch.randint(0, model.config.vocab_size, (cfg.prompts.num, cfg.prompts.length), generator=g)
    from alignscope import probe

    result = probe(model, ids, settings=probe_settings(cfg.probe))
    folder = result.save(run_dir / "probe")
    meta = result.meta
    if meta["k_clipped"]:
        log.info("K clipped to d=%s for K in %s", meta["d_model"], meta["k_clipped"])
    title = (
        f"{meta['model_class']} at random init (seed {meta['init_seed']}): {meta['num_blocks']} blocks, "
        f"d={meta['d_model']}; {len(result.tokens)} tokens probed in {meta['seconds']:.2f}s"
    )
    log_block(log, title, format_scalars(result.scalars()))
    log.info("saved: %s", folder)


if __name__ == "__main__":
    main()

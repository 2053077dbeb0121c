"""``alignscope-probe`` (also ``python -m alignscope.probe_app``): probe a model, pretrained or at random init.

Hydra app over ``conf/probe_app.yaml``. Prompts are probed one at a time and each one's result goes to the
run folder as soon as it is computed (``prompts/p<i>/`` and a line of ``probes.jsonl``), so a crash loses
nothing and a rerun in the same folder continues where it stopped. At the end the joined result is written
to ``result/`` with ``scalars.json``, ``run.json`` (what was probed) and figures, and logged to W&B
(offline by default): one group per model, job type ``probe``, the init condition as a tag and config key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from alignscope.cli.config import config_dir
from alignscope.cli.runtime import build, finish_wandb
from alignscope.result import format_scalars


def revision_step(revision: str | None) -> int:
    """The training step of a checkpoint revision such as ``step1000`` (0 when there is none)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else 0


def _loggers(cfg: DictConfig, tags: list[str]) -> list[Any]:
    out = []
    for _name, spec in (cfg.get("logger") or {}).items():
        if "WandbLogger" in spec.get("_target_", ""):
            out.append(
                build(
                    spec,
                    group=cfg.get("group") or cfg.model.name,
                    job_type="probe",
                    tags=tags,
                    name=f"{cfg.model.name}-{cfg.model.init}"
                    + (f"-{cfg.model.revision}" if cfg.model.revision else ""),
                )
            )
        else:
            out.append(build(spec))
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    """Load, probe prompt by prompt (saving each), join, log; return the scalars."""
    from tqdm.auto import tqdm

    from alignscope import plots
    from alignscope.models import get_adapter
    from alignscope.probe import planned_engine
    from alignscope.prompts import load_prompts
    from alignscope.result import ProbeResult
    from alignscope.zoo import load_tokenizer

    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompt_cfg = OmegaConf.to_container(cfg.prompts, resolve=True)
    texts = load_prompts(**prompt_cfg)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    model_cfg.pop("_partial_", None)
    model = build(cfg.model)()
    tokenizer = load_tokenizer(**model_cfg)
    num_blocks = len(get_adapter(model).blocks(model))
    keep = (
        list(cfg.report_blocks)
        if cfg.get("report_blocks") is not None
        else sorted({0, num_blocks // 2, num_blocks - 1})
    )
    probe_fn = build(cfg.probe)
    settings = getattr(probe_fn, "keywords", {})
    path = planned_engine(
        model, settings.get("engine", "auto"), settings.get("ks", (10, 30, 50)), settings.get("layers")
    )
    if path == "randomized":  # no Jacobians are formed: no |U_j^T J_i V_j| grids for the report
        keep = None
    info = {
        "model": cfg.model.name,
        "init": cfg.model.init,
        "revision": cfg.model.revision,
        "step": revision_step(cfg.model.revision),
        "seed": cfg.seed,
        "source": cfg.model.source,
        "hub_id": cfg.model.get("hub_id"),
        "dtype": cfg.model.dtype,
        "prompts": texts,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    loggers = _loggers(cfg, tags=[f"init-{cfg.model.init}", str(cfg.model.name)])
    try:
        for logger in loggers:
            logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "init": cfg.model.init})
        parts = []
        done = {json.loads(line)["prompt"] for line in _lines(run_dir / "probes.jsonl")}
        for i, text in enumerate(
            tqdm(texts, desc=f"probe {cfg.model.name} ({cfg.model.init})", unit="prompt")
        ):
            folder = run_dir / "prompts" / f"p{i:03d}"
            if i in done and folder.is_dir():
                parts.append(ProbeResult.load(folder))
                continue
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=cfg.max_length)[
                "input_ids"
            ]
            part = probe_fn(model, ids, keep_blocks=keep, progress=False)
            part.save(folder)
            with open(run_dir / "probes.jsonl", "a") as fh:
                fh.write(json.dumps({"prompt": i, "text": text, **part.scalars()}) + "\n")
            parts.append(part)
        result = ProbeResult.concat(parts)
        result.meta.update({"run": {k: v for k, v in info.items() if k != "prompts"}})
        result.save(run_dir / "result")
        scalars = result.scalars()
        (run_dir / "scalars.json").write_text(json.dumps(scalars, indent=2, sort_keys=True))
        figures = {
            f"coupling_k{k}": plots.save(
                plots.coupling_heatmaps({cfg.model.init: result}, k),
                run_dir / "figures" / f"coupling_k{k}.png",
            )
            for k in result.ks
        }
        figures["trajectories_pca"] = plots.save(
            plots.trajectory_pca({cfg.model.init: result}), run_dir / "figures" / "trajectories_pca.png"
        )
        for logger in loggers:
            logger.log_metrics({f"align/{k}": v for k, v in scalars.items()}, step=info["step"])
            if type(logger).__name__ == "WandbLogger":
                for key, path in figures.items():
                    logger.log_image(key=f"align/figures/{key}", images=[str(path)], step=info["step"])
        print(
            f"{cfg.model.name} ({cfg.model.init}{', ' + cfg.model.revision if cfg.model.revision else ''}): "
            f"{len(result.tokens)} prompts, run folder {run_dir}"
        )
        print(format_scalars(scalars, indent="  "))
        _finish(loggers, 0)
        return scalars
    except BaseException:
        _finish(loggers, 1)
        raise


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _finish(loggers: list[Any], exit_code: int) -> None:
    for logger in loggers:
        if hasattr(logger, "finalize"):
            logger.finalize("success" if exit_code == 0 else "failed")
    finish_wandb(loggers, exit_code)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="probe_app")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

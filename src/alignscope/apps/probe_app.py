"""``alignscope-probe`` (also ``python -m alignscope.apps.probe_app``): probe a model, pretrained or at random init.

Hydra app over ``conf/probe_app.yaml``. Prompts are probed one at a time and each one's result goes to the
run folder as soon as it is computed (``prompts/p<i>/`` and a line of ``probes.jsonl``), so a crash loses
nothing and a rerun in the same folder continues where it stopped. At the end the joined result is written
to ``result/`` with ``scalars.json``, ``run.json`` (what was probed) and figures, and logged to W&B
(offline by default): job type ``probe``, the init condition as a tag and config key (docs/apps.md).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from alignscope.apps import loggers as app_loggers
from alignscope.apps import plots, sweeps
from alignscope.apps.app_help import register_help_resolver
from alignscope.apps.config import config_dir
from alignscope.apps.logs import log_block, route_lightning_logs, setup_app_logging
from alignscope.apps.monitor_wandb import log_artifact, log_images, log_metrics
from alignscope.apps.problems import announce_problems
from alignscope.apps.run_folder import (
    RunFolder,
    RunFolderError,
    append_record,
    package_version,
    read_records,
    text_digest,
    weights_digest,
    write_json,
)
from alignscope.apps.runtime import build, probe_settings
from alignscope.probing.result import format_scalars
from alignscope.probing.settings import ProbeSettings

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""Files of which a local model folder needs one: a saved tokenizer (fast, SentencePiece, BPE or WordPiece)."""
LARGE_MODEL_PARAMS = 100_000_000
"""From this many parameters the probe app shows a bar within each prompt (over its blocks)."""
PROBES = "probes.jsonl"
PROBE_APP_RESULTS = (
    "prompts",
    PROBES,
    "result",
    "scalars.json",
    "run.json",
    "figures",
    "csv",
    "wandb",
    sweeps.COMPLETE,
)
"""The probe app's entries in its run folder (what an overwrite deletes)."""


class ProbeAppConfigError(ValueError):
    """A probe-app setting that cannot work; the message says what to change."""


def revision_step(revision: str | None) -> int:
    """The training step of a checkpoint revision such as ``step1000`` (0 when there is none)."""
    match = re.fullmatch(r"step(\d+)", revision or "")
    return int(match.group(1)) if match else 0


def _loggers(cfg: DictConfig) -> list[Any]:
    """The ``logger`` group's loggers (:mod:`alignscope.apps.loggers`); ``run_name`` defaults to
    ``<model>-<init>[-<revision>]``."""
    name = f"{cfg.model.name}-{cfg.model.init}" + (f"-{cfg.model.revision}" if cfg.model.revision else "")
    return app_loggers.build_loggers(cfg, default_name=name)


def fingerprint(cfg: DictConfig, texts: list[str], settings: ProbeSettings) -> dict[str, Any]:
    """Everything that determines this run's numbers except the weights' hash (added once loaded)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("_target_", "_partial_"):
        model.pop(key, None)
    if model.get("path"):
        model["path"] = str(Path(model["path"]).expanduser().resolve())
    if model.get("init") != "random":
        model.pop("seed", None)  # pretrained weights do not depend on the seed
    return {
        "app": "alignscope-probe",
        "alignscope_version": package_version(),
        "model": model,
        "prompts": {"texts": list(texts), "max_length": cfg.max_length},
        "probe": settings.fingerprint(),
        "report_blocks": OmegaConf.to_container(cfg.report_blocks) if cfg.get("report_blocks") else None,
    }


def _check_settings(cfg: DictConfig) -> ProbeSettings:
    """The probe settings, and the app's own settings checked, before any folder, model or data work."""
    settings = probe_settings(cfg.probe)
    if not isinstance(cfg.get("overwrite", False), bool):
        raise ProbeAppConfigError(f"overwrite must be true or false, got {cfg.overwrite!r}")
    if isinstance(cfg.max_length, bool) or not isinstance(cfg.max_length, int) or cfg.max_length < 1:
        raise ProbeAppConfigError(f"max_length must be a positive number of tokens, got {cfg.max_length!r}")
    return settings


def check_local_tokenizer(model: DictConfig) -> None:
    """A ``source=local`` folder must hold a tokenizer (the prompts are tokenized with the model's own): refused
    before any weights are loaded or logger is created."""
    if model.get("source") != "local" or not model.get("path"):
        return
    folder = Path(model.path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ProbeAppConfigError(
            f"model.path={model.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): the probe app "
            "tokenizes its prompts with the model's own tokenizer; save it into the folder with "
            "tokenizer.save_pretrained(<folder>)"
        )


def report_blocks(cfg: DictConfig, settings: ProbeSettings, num_blocks: int) -> list[int]:
    """The blocks whose Jacobians are kept for the report: ``cfg.report_blocks``, else three adjacent probed
    layers in the middle (adjacent blocks are the ones whose ``|U_j^T J_i V_j|`` grid shows coupling)."""
    from alignscope.models import resolve_layers

    probed = resolve_layers(settings.layers, num_blocks)
    if cfg.get("report_blocks") is None:
        start = max(0, len(probed) // 2 - 1)
        return probed[start : start + 3]
    keep = resolve_layers(list(cfg.report_blocks), num_blocks)
    if not set(keep) <= set(probed):
        raise ProbeAppConfigError(
            f"report_blocks {sorted(set(keep) - set(probed))} are not among the probed layers {probed}: "
            "choose report_blocks among probe.layers, or report_blocks=null"
        )
    return keep


def tokenize(tokenizer: Any, texts: list[str], max_length: int, context: int | None) -> list[Any]:
    """``[1, T]`` ids per prompt, truncated to ``max_length`` and to the model's context (with a warning)."""
    limit = min(max_length, context) if context else max_length
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if context and ids.shape[1] > context and context < max_length:
            warnings.warn(
                f"prompt {i} has {ids.shape[1]} tokens, more than the model's context of {context} "
                f"positions: truncated to {context} (max_length={max_length})",
                stacklevel=2,
            )
        out.append(ids[:, :limit])
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    """Load, probe prompt by prompt (saving each), join, log; return the scalars."""
    from alignscope.apps.prompts import load_prompts

    settings = _check_settings(cfg)
    texts = load_prompts(**OmegaConf.to_container(cfg.prompts, resolve=True))
    check_local_tokenizer(cfg.model)
    with RunFolder(cfg.paths.run_dir, PROBE_APP_RESULTS, app="alignscope-probe") as folder:
        fp = fingerprint(cfg, texts, settings)
        done = sweeps.probe_done(folder.path, folder.stored_fingerprint, fp)
        if sweeps.should_skip(folder.path, "alignscope-probe", cfg, done):  # a rerun sweep: nothing to do
            return json.loads((folder.path / "scalars.json").read_text())
        folder.check(fp, overwrite=cfg.get("overwrite", False))  # before the (maybe slow) model load
        sweeps.unmark(folder.path)
        scalars = _run(cfg, settings, folder, fp, texts)
        sweeps.mark_complete(folder.path, "alignscope-probe", cfg)
        return scalars


def _run(
    cfg: DictConfig, settings: ProbeSettings, folder: RunFolder, fp: dict[str, Any], texts: list[str]
) -> dict[str, float]:
    """Load the model into the claimed folder, probe every prompt not yet done, join, write, log."""
    from alignscope.models import context_length, get_adapter
    from alignscope.models.zoo import load_tokenizer
    from alignscope.probing.engines import planned_engine

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_", None)
    model_cfg.pop("_partial_", None)
    tokenizer = load_tokenizer(**model_cfg)  # before the (maybe slow) weights: a missing one fails at once
    model = build(cfg.model)()
    fp["weights"] = {"class": type(model).__name__, "sha256": weights_digest(model)}
    folder.claim(fp, overwrite=cfg.get("overwrite", False))
    keep: list[int] | None = report_blocks(cfg, settings, len(get_adapter(model).blocks(model)))
    if planned_engine(model, settings) == "randomized":  # no Jacobians: no |U_j^T J_i V_j| grids
        keep = None
    ids = tokenize(tokenizer, texts, cfg.max_length, context_length(model))
    info = run_info(cfg, texts, model, fp["weights"]["sha256"])
    write_json(folder.path / "run.json", info)
    loggers = _loggers(cfg)
    route_lightning_logs(load=False)
    try:
        config = {
            "app": "alignscope-probe",
            **OmegaConf.to_container(cfg, resolve=True),
            "init": cfg.model.init,
        }
        app_loggers.start(loggers, config)
        parts = _probe_prompts(cfg, settings, folder.path, model, texts, ids, keep)
        scalars = _write_and_log(cfg, folder.path, parts, info, loggers)
        app_loggers.finish(loggers, 0)
        return scalars
    except BaseException:
        app_loggers.finish(loggers, 1)
        raise


def run_info(cfg: DictConfig, texts: list[str], model: Any, weights_sha256: str) -> dict[str, Any]:
    """``run.json``: what was probed (model entry, init, revision and its step, seed, prompts, weights)."""
    return {
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
        "weights_sha256": weights_sha256,
    }


def _probe_prompts(
    cfg: DictConfig,
    settings: ProbeSettings,
    run_dir: Path,
    model: Any,
    texts: list[str],
    ids: list[Any],
    keep: list[int] | None,
) -> list[Any]:
    """One ``ProbeResult`` per prompt: reused from ``prompts/p<i>/`` when its record matches this prompt's text
    and token ids, else probed, saved and recorded at once."""
    from tqdm.auto import tqdm

    from alignscope.probing.probe import probe
    from alignscope.probing.result import ProbeResult

    done = {r["prompt"]: r for r in read_records(run_dir / PROBES)}
    large = sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMS
    inner = replace(settings, progress=settings.progress or large)  # a bar within each prompt
    parts = []
    for i, text in enumerate(tqdm(texts, desc=f"probe {cfg.model.name} ({cfg.model.init})", unit="prompt")):
        prompt_dir = run_dir / "prompts" / f"p{i:03d}"
        ids_digest = text_digest(ids[i].tolist())
        stored = done.get(i)
        if stored is not None and prompt_dir.is_dir():
            if stored.get("text") != text or stored.get("ids_sha256") != ids_digest:
                raise RunFolderError(
                    f"{run_dir / PROBES} records prompt {i} with other text or token ids than this run "
                    f"({stored.get('text')!r} vs {text!r}); the folder was changed by hand. Use a new folder "
                    "or overwrite=true."
                )
            parts.append(ProbeResult.load(prompt_dir))
            continue
        part = probe(model, ids[i], keep_blocks=keep, settings=inner)
        part.save(prompt_dir)
        append_record(
            run_dir / PROBES, {"prompt": i, "text": text, "ids_sha256": ids_digest, **part.scalars()}
        )
        parts.append(part)
    return parts


def _write_and_log(
    cfg: DictConfig, run_dir: Path, parts: list[Any], info: dict[str, Any], loggers: list[Any]
) -> dict[str, float]:
    """Join the prompts' results; write ``result/``, ``scalars.json`` and figures; log; print; return scalars."""
    from alignscope.probing.result import ProbeResult

    result = ProbeResult.concat(parts)
    result.meta.update({"run": {k: v for k, v in info.items() if k != "prompts"}})
    result.save(run_dir / "result")
    scalars = result.scalars()
    write_json(run_dir / "scalars.json", scalars)
    problems = announce_problems(result, scalars, f"{cfg.model.name} ({cfg.model.init})")
    figures = plots.save_all(figure_builders(cfg, result, info), run_dir / "figures")
    log_metrics(loggers, {f"align/{k}": v for k, v in scalars.items()}, info["step"])
    log_images(loggers, figures, "align/figures/", info["step"])
    files = ("result", "scalars.json", "run.json")
    log_artifact(loggers, {name: run_dir / name for name in files}, "probe-result")
    revision = f", {cfg.model.revision}" if cfg.model.revision else ""
    title = (
        f"{cfg.model.name} ({cfg.model.init}{revision}): {len(result.tokens)} prompts, run folder {run_dir}"
    )
    log_block(log, title, format_scalars(scalars, indent="  "))
    if problems:
        log.warning("%d problem(s) with these numbers, see the warnings above", len(problems))
    return scalars


def figure_builders(cfg: DictConfig, result: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The probe app's figures by name: per K the coupling heat map and the coupling against block distance,
    then the trajectory PCA, spectra, step sizes and norms, and the ``|U_j^T J_i V_j|`` grid of the kept
    blocks (when their Jacobians were kept); titles name the model, init and step."""
    run = f"{cfg.model.name}, {cfg.model.init} init, step {info['step']}"
    labelled = {f"{cfg.model.init} (step {info['step']})": result}
    builders: dict[str, Any] = {}
    for k in result.ks:
        builders[f"coupling_k{k}"] = partial(
            plots.coupling_heatmaps, labelled, k, f"{run}: coupling, K = {k}"
        )
        title = f"{run}: coupling against block distance, K = {k}"
        builders[f"coupling_distance_k{k}"] = partial(plots.coupling_vs_distance, labelled, k, title)
    builders["trajectories_pca"] = partial(plots.trajectory_pca, labelled, run)
    builders["spectra"] = partial(plots.spectra_vs_depth, labelled, run)
    builders["steps_and_norms"] = partial(plots.steps_and_norms, labelled, run)
    if "block_jacobians" in result.extras:
        builders["block_grid"] = partial(plots.block_grid_figure, result, min(result.ks), run)
    if result.token_coupling is not None:  # probe.token_coupling=true: the token-by-token grid of prompt 0
        k = min(result.ks)
        title = f"{run}: coupling across the tokens of prompt 0, K = {k}"
        builders[f"token_coupling_k{k}"] = partial(plots.token_coupling_grid, result, k, title)
    return builders


register_help_resolver()
sweeps.register_gpu_resolver()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="probe_app")
def main(cfg: DictConfig) -> None:
    setup_app_logging()  # Lightning's lines are routed once the loggers have imported it
    sweeps.assign_gpu()  # before anything initializes CUDA
    run(cfg)


if __name__ == "__main__":
    main()

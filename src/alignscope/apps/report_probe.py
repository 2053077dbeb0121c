"""The probe-sweep part of a report: pretrained against random init per model (mean and spread across
prompts, ratio), and the per-model figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.apps.report_runs import Run, latest_by_init, step_of
from alignscope.apps.report_table import (
    RunContext,
    markdown_table,
    mean_std,
    ratio_cell,
    value_cell,
    with_spread,
    write_csv,
)
from alignscope.probing.result import HEADLINE

REPORT_METRICS = (
    *HEADLINE,
    "alignment_across/k10",
    "expodistance/step_r2",
    "expodistance/norm_r2",
    "spectra/inv_s1_slope",
    "spectra/inv_s1_r2",
)
"""The headline scalars and the fit qualities, in the report's table."""

TABLE_COLUMNS = (
    "model",
    "revision",
    "metric",
    "pretrained",
    "pretrained_std",
    "random",
    "random_std",
    "ratio",
    "prompts",
)
"""``table.csv``: the value of each init (``scalars.json``), its standard deviation across prompts (the
per-prompt lines of ``probes.jsonl``), the ratio pretrained / random, and the number of prompts."""


def prompt_scalars(run: Run) -> list[dict[str, Any]]:
    """The per-prompt scalar records of a probe run (``probes.jsonl``; empty when it is not there)."""
    path = run.folder / "probes.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _context(run: Run) -> RunContext:
    return RunContext.from_scalars(
        run.scalars, json.loads((run.folder / "result" / "meta.json").read_text()).get("d_model")
    )


def _side(run: Run | None, metric: str, per_prompt: list[dict[str, Any]]) -> tuple[Any, float | None]:
    """The value (or note) of ``metric`` in ``run`` and its standard deviation across prompts."""
    if run is None or metric not in run.scalars:
        return None, None
    cell = value_cell(metric, run.scalars[metric], _context(run))
    return cell, mean_std([p[metric] for p in per_prompt if metric in p])[1]


def comparison_rows(runs: list[Run], metrics: Sequence[str] = REPORT_METRICS) -> list[dict[str, Any]]:
    """Long-format rows (:data:`TABLE_COLUMNS`) per model, revision and metric."""
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.revision), {})[r.init] = r
    rows = []
    for (model, revision), by_init in sorted(
        groups.items(), key=lambda kv: (kv[0][0], step_of(kv[0][1]), kv[0][1])
    ):
        pre, ran = by_init.get("pretrained"), by_init.get("random")
        pre_p, ran_p = (prompt_scalars(r) if r else [] for r in (pre, ran))
        for metric in metrics:
            a, a_std = _side(pre, metric, pre_p)
            b, b_std = _side(ran, metric, ran_p)
            if a is None and b is None:
                continue
            rows.append(
                {
                    "model": model,
                    "revision": revision,
                    "metric": metric,
                    "pretrained": a,
                    "pretrained_std": a_std,
                    "random": b,
                    "random_std": b_std,
                    "ratio": ratio_cell(a, b, "random"),
                    "prompts": max(len(pre_p), len(ran_p)) or None,
                }
            )
    return rows


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """``table.csv`` and ``table.md`` (values as mean ± std across prompts); returns the Markdown."""
    write_csv(rows, TABLE_COLUMNS, out / "table.csv")
    shown = [
        {
            **r,
            "pretrained": with_spread(r["pretrained"], r["pretrained_std"]),
            "random": with_spread(r["random"], r["random_std"]),
        }
        for r in rows
    ]
    cols = ("model", "revision", "metric", "pretrained", "random", "ratio", "prompts")
    md = markdown_table(
        shown, cols, {"pretrained": "pretrained (± std over prompts)", "random": "random (± std)"}
    )
    (out / "table.md").write_text(md)
    return md


def model_figures(model: str, by_init: dict[str, Run], out: Path, k: int = 10) -> list[Path]:
    """All per-model figures (coupling, PCA, the block grid of each init with block Jacobians, the token
    grid of each init probed with token_coupling, spectra, step sizes); returns their paths."""
    from alignscope.apps import plots

    results = {init: r.result for init, r in sorted(by_init.items())}
    tag = model.replace("/", "_")
    paths = [
        plots.save(plots.coupling_heatmaps(results, k), out / f"{tag}_coupling_k{k}.png"),
        plots.save(plots.trajectory_pca(results), out / f"{tag}_pca.png"),
    ]
    for init, res in results.items():
        if "block_jacobians" in res.extras:
            fig = plots.block_grid_figure(res, k, f"{model} ({init})")
            paths.append(plots.save(fig, out / f"{tag}_grid_{init}.png"))
        if res.token_coupling is not None and k in res.token_coupling:
            fig = plots.token_coupling_grid(res, k, f"{model} ({init}): coupling across tokens, K = {k}")
            paths.append(plots.save(fig, out / f"{tag}_token_coupling_{init}.png"))
    paths.append(plots.save(plots.spectra_vs_depth(results), out / f"{tag}_spectra.png"))
    paths.append(plots.save(plots.steps_and_norms(results), out / f"{tag}_trajectory.png"))
    return paths


def revision_figure(model: str, runs: list[Run], out: Path, metrics: Sequence[str]) -> Path | None:
    """Each metric against checkpoint step, pretrained checkpoints (and random if present); None with fewer
    than two checkpoint revisions of ``model``."""
    from alignscope.apps import plots

    stepped = [r for r in runs if r.model == model and r.revision and step_of(r.revision) >= 0]
    if len({r.revision for r in stepped}) < 2:
        return None
    names = [m for m in metrics if any(m in r.scalars for r in stepped)]
    series = {
        name: {
            init: sorted(
                (step_of(r.revision), r.scalars.get(name, float("nan"))) for r in stepped if r.init == init
            )
            for init in ("pretrained", "random")
        }
        for name in names
    }
    return plots.save(plots.metrics_vs_checkpoint(series), out / f"{model.replace('/', '_')}_vs_step.png")


def all_figures(runs: list[Run], folder: Path, k: int) -> list[Path]:
    """The figures of every model: per-model figures of its latest revision per init, and the revision sweep."""
    figs = []
    for model in sorted({r.model for r in runs}):
        figs += model_figures(model, latest_by_init(runs, model), folder, k=k)
        fig = revision_figure(model, runs, folder, REPORT_METRICS)
        if fig is not None:
            figs.append(fig)
    return figs

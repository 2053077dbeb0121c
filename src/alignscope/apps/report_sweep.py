"""The training-sweep part of a report: a table per job, seeds aggregated as replicates, the metrics
against step, and the correlation of each metric's final value with the final validation loss across jobs.

Files (in the report folder): ``correlation.md`` / ``.json`` (coupling against generalization, across and
within jobs: :mod:`alignscope.apps.report_generalization`), ``training_jobs.csv`` / ``.md``, ``training_replicates.csv`` / ``.md``,
``training_correlation.csv`` / ``.md``, ``figures/training_metrics_vs_step.png`` and
``figures/training_<metric>_vs_val_loss.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.apps.correlation import Regression, correlations, points_with
from alignscope.apps.report_table import (
    Note,
    difference_cell,
    markdown_table,
    mean_std,
    value_cell,
    with_spread,
    write_csv,
)
from alignscope.apps.report_training import VAL_LOSS, TrainingRun, replicate_groups
from alignscope.probing.result import HEADLINE

JOB_COLUMNS = ("job", "setting", "seed", "metric", "init", "final", "change")
REPLICATE_COLUMNS = (
    "setting",
    "metric",
    "seeds",
    "init_mean",
    "init_std",
    "final_mean",
    "final_std",
    "change_mean",
    "change_std",
)
CORRELATION_COLUMNS = ("metric", "n", "slope", "intercept", "r2", "p_value")


def job_rows(run: TrainingRun) -> list[dict[str, Any]]:
    """Init, final and change of each headline metric in ``run.summary``, then the final validation loss."""
    ctx, rows = run.context, []
    for metric in HEADLINE:
        entry = run.summary.get(metric)
        if not isinstance(entry, dict):
            continue
        init, final = value_cell(metric, entry["init"], ctx), value_cell(metric, entry["final"], ctx)
        change = entry["change"] if not isinstance(difference_cell(init, final), Note) else Note("n/a")
        rows.append({"metric": metric, "init": init, "final": final, "change": change})
    rows.append({"metric": VAL_LOSS, "init": None, "final": run.val_loss, "change": None})
    return [{"job": run.job, "setting": run.setting, "seed": run.seed, **r} for r in rows]


def write_job_tables(runs: Sequence[TrainingRun], out: Path) -> str:
    """``training_jobs.csv`` (every job) and ``training_jobs.md`` (a table per job); returns the Markdown."""
    rows = [r for run in runs for r in job_rows(run)]
    write_csv(rows, JOB_COLUMNS, out / "training_jobs.csv")
    parts = []
    for run in runs:
        steps = f"step {run.summary.get('init_step', '?')} to {run.summary.get('final_step', '?')}"
        parts += [f"### Job {run.job}: {run.setting}", "", f"`{run.folder}`, {steps}", ""]
        parts.append(markdown_table(job_rows(run), ("metric", "init", "final", "change")))
    md = "\n".join(parts)
    (out / "training_jobs.md").write_text(md)
    return md


def _stats(runs: Sequence[TrainingRun], metric: str, key: str) -> tuple[float | None, float | None]:
    if metric == VAL_LOSS:
        values = [r.val_loss for r in runs] if key == "final" else []
    else:
        values = [r.summary[metric][key] for r in runs if isinstance(r.summary.get(metric), dict)]
    return mean_std([v for v in values if v is not None])


def replicate_rows(runs: Sequence[TrainingRun]) -> list[dict[str, Any]]:
    """Per setting and metric: the number of seeds, and mean and sample std over them of init, final, change."""
    rows = []
    for setting, group in replicate_groups(runs).items():
        ctx = group[0].context
        for metric in (*HEADLINE, VAL_LOSS):
            row: dict[str, Any] = {"setting": setting, "metric": metric, "seeds": len(group)}
            for key in ("init", "final", "change"):
                mean, std = _stats(group, metric, key)
                cell = mean if key == "change" else value_cell(metric, mean, ctx)
                row[f"{key}_mean"], row[f"{key}_std"] = cell, (None if isinstance(cell, Note) else std)
            if any(isinstance(row[f"{k}_mean"], Note) for k in ("init", "final")):
                row["change_mean"], row["change_std"] = Note("n/a"), None
            if row["final_mean"] is not None:
                rows.append(row)
    return rows


def write_replicates(runs: Sequence[TrainingRun], out: Path) -> str:
    """``training_replicates.csv`` / ``.md`` (mean ± std over seeds); returns the Markdown."""
    rows = replicate_rows(runs)
    write_csv(rows, REPLICATE_COLUMNS, out / "training_replicates.csv")
    shown = [
        {**r, **{k: with_spread(r[f"{k}_mean"], r[f"{k}_std"]) for k in ("init", "final", "change")}}
        for r in rows
    ]
    md = markdown_table(shown, ("setting", "metric", "seeds", "init", "final", "change"))
    (out / "training_replicates.md").write_text(md)
    return md


def val_loss_points(runs: Sequence[TrainingRun]) -> list[dict[str, Any]]:
    """One point per job: its label, the final value of each headline metric and its final validation loss."""
    return [
        {
            "label": run.job,
            VAL_LOSS: run.val_loss,
            **{m: run.summary[m]["final"] for m in HEADLINE if isinstance(run.summary.get(m), dict)},
        }
        for run in runs
    ]


def _regression_row(reg: Regression) -> dict[str, Any]:
    """A table row of ``reg``; with fewer than 3 jobs a note in place of the fit."""
    if reg.n < 3:
        return {"metric": reg.x_name, "n": reg.n, "slope": Note(f"n/a: {reg.n} jobs, a fit needs 3")}
    return {"metric": reg.x_name, "n": reg.n, **{k: getattr(reg, k) for k in CORRELATION_COLUMNS[2:]}}


def write_val_loss_correlation(
    runs: Sequence[TrainingRun], out: Path
) -> tuple[str, list[Regression], list[Path]]:
    """Regress the final validation loss on each headline metric's final value across jobs:
    ``training_correlation.csv`` / ``.md`` and a scatter plot of ``coupling/k10``."""
    from alignscope.apps import plots

    points = val_loss_points(runs)
    regs = correlations(points, [m for m in HEADLINE if any(m in p for p in points)], VAL_LOSS)
    rows = [_regression_row(r) for r in regs]
    write_csv(
        [
            {**r, **{k: getattr(g, k) for k in ("slope", "intercept", "r2", "p_value")}}
            for r, g in zip(rows, regs)
        ],
        CORRELATION_COLUMNS,
        out / "training_correlation.csv",
    )
    md = markdown_table(rows, CORRELATION_COLUMNS, {"r2": "R^2", "p_value": "p"})
    (out / "training_correlation.md").write_text(md)
    figs = []
    for reg in regs:
        pts = points_with(points, reg.x_name, VAL_LOSS)
        if reg.x_name == "coupling/k10" and pts:
            name = f"training_{reg.x_name.replace('/', '_')}_vs_val_loss.png"
            figs.append(plots.save(plots.regression_scatter(pts, reg, "label"), out / "figures" / name))
    return md, regs, figs


def steps_figure(runs: Sequence[TrainingRun], out: Path) -> Path:
    """``figures/training_metrics_vs_step.png``: every headline metric against step, a line per job."""
    from alignscope.apps import plots
    from alignscope.apps.report_figures import sweep_metrics_vs_step

    index = {s: i for i, s in enumerate(replicate_groups(runs))}
    jobs = {f"{r.job}: {r.setting}": (index[r.setting], r.records) for r in runs}
    return plots.save(sweep_metrics_vs_step(jobs, HEADLINE), out / "figures" / "training_metrics_vs_step.png")


def training_section(
    runs: Sequence[TrainingRun], out: Path, correlation_name: str = "correlation"
) -> tuple[list[str], dict[str, Any]]:
    """Write every training table and figure; returns the report's Markdown lines and what was written.
    ``correlation_name``: the stem of the generalization files (:mod:`alignscope.apps.report_generalization`)."""
    from alignscope.apps.report_generalization import write_generalization

    out.mkdir(parents=True, exist_ok=True)
    jobs_md = write_job_tables(runs, out)
    reps_md = write_replicates(runs, out)
    gen_md, gen, gen_figs = write_generalization(runs, out, correlation_name)
    corr_md, regs, scatter = write_val_loss_correlation(runs, out)
    figs = [steps_figure(runs, out), *gen_figs, *scatter]
    seeds = {s: len(g) for s, g in replicate_groups(runs).items()}
    lines = [
        f"## Training runs ({len(runs)} jobs, {len(seeds)} settings)",
        "",
        "### Seeds as replicates ([training_replicates.md](training_replicates.md), "
        "[training_replicates.csv](training_replicates.csv))",
        "",
        "Mean ± sample std over the jobs that differ only in seed.",
        "",
        reps_md,
        f"### Coupling and generalization ([{correlation_name}.md]({correlation_name}.md), "
        f"[{correlation_name}.json]({correlation_name}.json))",
        "",
        gen_md,
        "",
        "### Final validation loss against each metric's final value, across jobs "
        "([training_correlation.md](training_correlation.md), [training_correlation.csv](training_correlation.csv))",
        "",
        corr_md,
        "### Per job ([training_jobs.md](training_jobs.md), [training_jobs.csv](training_jobs.csv))",
        "",
        jobs_md,
        "### Figures",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figs],
        "",
    ]
    written = {"training_runs": list(runs), "regressions_val_loss": regs, "training_figures": figs}
    return lines, {**written, "generalization": gen}

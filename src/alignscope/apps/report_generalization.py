"""Coupling against generalization in a training sweep: ``correlation.md`` / ``correlation.json`` and a
labelled scatter plot.

- Across jobs: the final validation loss (nats/token) regressed on each metric's final value, ``coupling/k10``
  first, then the other headline metrics, then the baselines the paper compares against: ``log10_params``
  (log10 of the parameter count), ``depth`` (blocks) and ``width`` (d) of each job's model (n, slope,
  intercept, r, R^2, p; scipy.stats.linregress).
- Within each job: Pearson's r of ``coupling/k10`` and the validation loss over the probe steps where
  validation also ran (the probe records' ``val/loss``), as the paper correlates them over Pythia's
  checkpoints; r needs 3 such steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.apps.correlation import (
    Regression,
    correlations,
    json_number,
    pearson,
    points_with,
    regression_dict,
)
from alignscope.apps.report_table import Note, markdown_table
from alignscope.apps.report_training import VAL_LOSS, TrainingRun
from alignscope.probing.result import HEADLINE

METRIC = "coupling/k10"
"""The metric the paper correlates with generalization."""
BASELINES = ("log10_params", "depth", "width")
"""Model-size baselines, from each job's last probe (``meta.json``)."""
AXIS_LABELS = {
    VAL_LOSS: "final validation loss (nats/token)",
    "coupling/k10": "final coupling/k10 (1 - m_10^2, dimensionless)",
    "log10_params": "log10(parameter count)",
    "depth": "depth (blocks)",
    "width": "width d (hidden size)",
}
TABLE_COLUMNS = ("x", "n", "slope", "intercept", "r", "r2", "p_value")
HEADERS = {"r2": "R^2", "p_value": "p"}


def job_labels(runs: Sequence[TrainingRun]) -> dict[str, str]:
    """Each job's label: its folder name and the overrides not shared by every job (seed included)."""
    sets = [set(r.overrides) for r in runs]
    common = set.intersection(*sets) if sets else set()
    return {r.job: " ".join([r.folder.name, *[o for o in r.overrides if o not in common]]) for r in runs}


def job_points(runs: Sequence[TrainingRun]) -> list[dict[str, Any]]:
    """One point per job: label, job, setting, final ``val/loss``, each headline metric's final value and
    the baselines."""
    labels = job_labels(runs)
    return [
        {
            "label": labels[run.job],
            "job": run.job,
            "folder": str(run.folder),
            VAL_LOSS: run.val_loss,
            **{m: run.summary[m]["final"] for m in HEADLINE if isinstance(run.summary.get(m), dict)},
            **run.size,
        }
        for run in runs
    ]


def x_names(points: Sequence[dict[str, Any]]) -> list[str]:
    """``coupling/k10``, the other headline metrics, then the baselines: those any point has."""
    names = [METRIC, *[m for m in HEADLINE if m != METRIC], *BASELINES]
    return [n for n in names if any(n in p for p in points)]


def within_run(runs: Sequence[TrainingRun], x_name: str = METRIC) -> list[dict[str, Any]]:
    """Per job: Pearson's r of ``x_name`` and ``val/loss`` over the probe steps that have both, with n and
    the steps (r is None with fewer than 3 steps)."""
    labels = job_labels(runs)
    rows = []
    for run in runs:
        pts = run.over_steps(x_name)
        r = pearson([p[x_name] for p in pts], [p[VAL_LOSS] for p in pts])
        steps = [int(p["step"]) for p in pts]
        rows.append(
            {"job": run.job, "label": labels[run.job], "n": len(pts), "r": json_number(r), "steps": steps}
        )
    return rows


def _table_row(reg: Regression) -> dict[str, Any]:
    row = regression_dict(reg)
    if reg.n < 3:
        return {"x": reg.x_name, "n": reg.n, "slope": Note(f"n/a: {reg.n} jobs, a fit needs 3")}
    return row


def _markdown(regs: Sequence[Regression], inside: Sequence[dict[str, Any]]) -> str:
    """The two tables of ``correlation.md``."""
    across = markdown_table([_table_row(r) for r in regs], TABLE_COLUMNS, HEADERS)
    rows = [{**r, "r": Note("n/a: fewer than 3 steps") if r["r"] is None else r["r"]} for r in inside]
    shown = [{**r, "steps": ", ".join(map(str, r["steps"]))} for r in rows]
    with_r = [r["r"] for r in inside if r["r"] is not None]
    mean = (
        f"mean r over {len(with_r)} jobs: {sum(with_r) / len(with_r):.3f}" if with_r else "no job has 3 steps"
    )
    return "\n".join(
        [
            f"Across jobs: the final {VAL_LOSS} (nats/token) regressed on each metric's final value, and on the "
            "model-size baselines (log10 of the parameter count, depth in blocks, width d).",
            "",
            across,
            f"Within each job: Pearson's r of {METRIC} and {VAL_LOSS} over the probe steps where validation "
            f"also ran ({mean}).",
            "",
            markdown_table(shown, ("label", "n", "r", "steps")),
        ]
    )


def scatter(points: Sequence[dict[str, Any]], reg: Regression) -> Any:
    """``reg``'s y against x, a point per job labelled by its job and overrides, the fitted line, axes with
    units (a matplotlib figure)."""
    from alignscope.apps import plots

    fig = plots.regression_scatter(points_with(points, reg.x_name, reg.y_name), reg, "label")
    ax = fig.axes[0]
    ax.margins(x=0.3)  # room for the labels right of the points
    ax.set_xlabel(AXIS_LABELS.get(reg.x_name, f"final {reg.x_name}"))
    ax.set_ylabel(AXIS_LABELS.get(reg.y_name, reg.y_name))
    ax.set_title(f"{reg.y_name} against {reg.x_name}: one point per job (n = {reg.n})", fontsize=9)
    return fig


def write_generalization(
    runs: Sequence[TrainingRun], out: Path, name: str = "correlation"
) -> tuple[str, dict[str, Any], list[Path]]:
    """Write ``<name>.md``, ``<name>.json`` and ``figures/<name>_coupling_k10_vs_val_loss.png``; returns the
    Markdown, the JSON object and the figures."""
    points = job_points(runs)
    regs = correlations(points, x_names(points), VAL_LOSS)
    inside = within_run(runs)
    data = {
        "y": VAL_LOSS,
        "y_unit": "nats/token",
        "across_jobs": [
            {**regression_dict(r), "kind": "baseline" if r.x_name in BASELINES else "metric"} for r in regs
        ],
        "within_run": {"x": METRIC, "y": VAL_LOSS, "jobs": inside},
        "points": [
            {k: (json_number(v) if k not in ("label", "job", "folder") else v) for k, v in p.items()}
            for p in points
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    md = _markdown(regs, inside)
    (out / f"{name}.md").write_text(md)
    figs = []
    main = next((r for r in regs if r.x_name == METRIC), None)
    if main is not None and main.n > 0:
        from alignscope.apps import plots

        path = out / "figures" / f"{name}_coupling_k10_vs_val_loss.png"
        figs.append(plots.save(scatter(points, main), path))
    return md, data, figs

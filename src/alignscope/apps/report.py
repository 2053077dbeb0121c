"""``alignscope-report``: tables, figures and correlations from the run folders of probe sweeps.

Reads run folders written by ``alignscope-probe`` (``run.json``, ``scalars.json``, ``result/``), not W&B, and
writes a report folder:

- ``table.md`` / ``table.csv``: every headline metric for each model (and revision), pretrained next to
  random init, and the ratio pretrained / random.
- ``figures/``: coupling matrices side by side, the ``|U_j^T J_i V_j|`` grid for the kept blocks, singular
  values and stable rank against depth, step sizes and norms against depth (LSS, expodistance), PCA of token
  trajectories, and each metric against checkpoint step for revision sweeps.
- ``correlation.md`` / ``correlation.csv`` and scatter plots (with ``--scores``): a linear regression of a
  benchmark score on a metric across models (slope, R^2, p-value), and the same for parameter count (log10),
  depth and width as baselines.

    alignscope-report multirun/probe/<date>/<time> --out reports/smollm2
    alignscope-report RUNS... --scores scores.csv --metric coupling/k10
    alignscope-report --scores paper_fig1a_scores.csv --x-column coupling_in_paper   # CSV columns only
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignscope.apps.correlation import Regression, correlations, points_with, regress
from alignscope.apps.report_runs import (
    ReportInputError,
    Run,
    check_k,
    check_metric,
    find_runs,
    latest_by_init,
    latest_pretrained,
    step_of,
)
from alignscope.apps.scores import ScoreTable, ScoreTableError, read_scores
from alignscope.probing.result import HEADLINE

__all__ = [
    "REPORT_METRICS",
    "Regression",
    "ReportInputError",
    "Run",
    "build_report",
    "check_k",
    "check_metric",
    "comparison_rows",
    "correlations",
    "find_runs",
    "latest_pretrained",
    "main",
    "model_figures",
    "regress",
    "revision_figure",
    "run_points",
    "write_correlation",
    "write_table",
]

REPORT_METRICS = (
    *HEADLINE,
    "alignment_across/k10",
    "expodistance/step_r2",
    "expodistance/norm_r2",
    "spectra/inv_s1_slope",
    "spectra/inv_s1_r2",
)
"""The headline scalars and the fit qualities, in the report's table."""


# --------------------------------------------------------------------------------------------- table
def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return float("nan")
    return a / b


def comparison_rows(runs: list[Run], metrics: Sequence[str] = REPORT_METRICS) -> list[dict[str, Any]]:
    """Long-format rows: model, revision, metric, pretrained, random, ratio (pretrained / random)."""
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.revision), {})[r.init] = r
    rows = []
    for (model, revision), by_init in sorted(
        groups.items(), key=lambda kv: (kv[0][0], step_of(kv[0][1]), kv[0][1])
    ):
        for metric in metrics:
            pre = by_init.get("pretrained")
            ran = by_init.get("random")
            a = pre.scalars.get(metric) if pre else None
            b = ran.scalars.get(metric) if ran else None
            if a is None and b is None:
                continue
            rows.append(
                {
                    "model": model,
                    "revision": revision,
                    "metric": metric,
                    "pretrained": a,
                    "random": b,
                    "ratio": _ratio(a, b),
                }
            )
    return rows


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """``table.csv`` and ``table.md``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    cols = ["model", "revision", "metric", "pretrained", "random", "ratio"]
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    return md


# --------------------------------------------------------------------------------------------- figures
def model_figures(model: str, by_init: dict[str, Run], out: Path, k: int = 10) -> list[Path]:
    """All per-model figures (coupling, PCA, the block grid of each init with block Jacobians, spectra,
    step sizes); returns their paths."""
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


def _all_figures(runs: list[Run], folder: Path, k: int) -> list[Path]:
    """The figures of every model: per-model figures of its latest revision per init, and the revision sweep."""
    figs = []
    for model in sorted({r.model for r in runs}):
        figs += model_figures(model, latest_by_init(runs, model), folder, k=k)
        fig = revision_figure(model, runs, folder, REPORT_METRICS)
        if fig is not None:
            figs.append(fig)
    return figs


# --------------------------------------------------------------------------------------------- correlation
def write_correlation(points: list[dict[str, Any]], regs: list[Regression], label_key: str, out: Path) -> str:
    """``correlation.csv``, ``correlation.md`` and one scatter plot per regression; returns the Markdown."""
    from alignscope.apps import plots

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "correlation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "n", "slope", "intercept", "r2", "p_value"])
        for r in regs:
            writer.writerow([r.x_name, r.y_name, r.n, r.slope, r.intercept, r.r2, r.p_value])
    md = ["| x | y | n | slope | intercept | R^2 | p-value |", "|---|---|---|---|---|---|---|"]
    md += [
        f"| {r.x_name} | {r.y_name} | {r.n} | {r.slope:.4g} | {r.intercept:.4g} | {r.r2:.3f} | {r.p_value:.2g} |"
        for r in regs
    ]
    text = "\n".join(md) + "\n"
    (out / "correlation.md").write_text(text)
    for r in regs:
        pts = points_with(points, r.x_name, r.y_name)
        if pts:
            fig = plots.regression_scatter(pts, r, label_key)
            plots.save(fig, out / f"scatter_{r.x_name.replace('/', '_')}.png")
    return text


def run_points(
    runs: list[Run], scores: ScoreTable, metric: str, score_column: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Join pretrained runs (latest revision per model) to score rows by model name or hub id.

    Returns the points and the score rows that match no run (``"gpt2 (line 3)"``).
    """
    points, unmatched = [], []
    latest = latest_pretrained(runs)
    for row in scores.rows:
        keys = {row.model, row.hub_id} - {""}
        match = [r for r in latest.values() if r.model in keys or r.info.get("hub_id") in keys]
        if not match:
            unmatched.append(f"{row.label} (line {row.line})")
            continue
        r = match[0]
        meta = r.result.meta
        points.append(
            {
                "label": row.model or r.model,
                metric: r.scalars.get(metric, float("nan")),
                score_column: row.values[score_column],
                "log10_params": math.log10(r.info.get("num_params") or meta.get("num_params")),
                "depth": meta["num_blocks"],
                "width": meta["d_model"],
            }
        )
    return points, unmatched


def _csv_points(scores: str, x_column: str, score_column: str) -> tuple[ScoreTable, list[dict[str, Any]]]:
    """Points from two columns of the scores CSV alone."""
    table = read_scores(scores, numeric=[x_column, score_column])
    points = [
        {"label": row.label, x_column: row.values[x_column], score_column: row.values[score_column]}
        for row in table.rows
    ]
    return table, points


def _run_score_points(
    runs: list[Run], scores: str, metric: str, score_column: str
) -> tuple[ScoreTable, list[dict[str, Any]], list[str]]:
    """Points joining the pretrained runs to the scores CSV; refuses inputs that give none."""
    if not runs:
        raise ReportInputError("--scores without run folders needs --x-column (a column of the CSV)")
    table = read_scores(scores, numeric=[score_column], need_ids=True)
    pretrained = list(latest_pretrained(runs).values())
    if not pretrained:
        raise ReportInputError(
            "--scores correlates pretrained runs, and these run folders hold none (model.init=random "
            "only): probe with model.init=pretrained, or use --x-column"
        )
    check_metric(pretrained, metric)
    points, unmatched = run_points(runs, table, metric, score_column)
    if not points:
        raise ReportInputError(
            f"no row of {scores} matches a pretrained probe run by model or hub_id: runs "
            f"{sorted({r.model for r in pretrained})} (hub ids "
            f"{sorted({r.info['hub_id'] for r in pretrained if r.info.get('hub_id')})}), score rows "
            f"{[row.label for row in table.rows]}; make the CSV's model or hub_id match"
        )
    return table, points, unmatched


def _input_notes(skipped: list[str], unmatched: list[str]) -> list[str]:
    """Markdown lines listing the score rows that were left out, and why."""
    lines = []
    if skipped:
        lines += ["Skipped rows (blank or non-numeric cells):", ""] + [f"- {x}" for x in skipped] + [""]
    if unmatched:
        lines += ["Score rows without a pretrained probe run:", ""] + [f"- {x}" for x in unmatched] + [""]
    return lines


# --------------------------------------------------------------------------------------------- entry point
def build_report(
    paths: Sequence[str | Path],
    out: str | Path,
    k: int = 10,
    metric: str = "coupling/k10",
    scores: str | None = None,
    score_column: str = "benchmark_score",
    x_column: str | None = None,
) -> dict[str, Any]:
    """Write the report folder; returns what was written (for tests and callers)."""
    out = Path(out)
    written: dict[str, Any] = {"out": out}
    sections = ["# alignscope report", ""]
    runs = find_runs(paths) if paths else []
    if paths and not runs:
        raise FileNotFoundError(f"no finished probe runs (run.json + result/) below {list(map(str, paths))}")
    if runs:
        check_k(runs, k)
    if scores:  # every input is checked before anything is written
        if x_column:
            table, points = _csv_points(scores, x_column, score_column)
            x_names, unmatched = [x_column], []
        else:
            table, points, unmatched = _run_score_points(runs, scores, metric, score_column)
            x_names = [metric, "log10_params", "depth", "width"]
        written["skipped"], written["unmatched"] = table.skipped, unmatched
    out.mkdir(parents=True, exist_ok=True)
    if runs:
        rows = comparison_rows(runs)
        written["rows"] = rows
        sections += ["## Pretrained against random init", "", write_table(rows, out)]
        figs = _all_figures(runs, out / "figures", k)
        written["figures"] = figs
        sections += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs] + [""]
    if scores:
        regs = correlations(points, x_names, score_column)
        written["regressions"] = regs
        sections += [
            f"## Correlation with {score_column} ({scores})",
            "",
            write_correlation(points, regs, "label", out),
            *_input_notes(table.skipped, unmatched),
        ]
    (out / "report.md").write_text("\n".join(sections) + "\n")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="alignscope-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="sweep or run folders of alignscope-probe")
    parser.add_argument("--out", default=None, help="report folder (default: <first run folder>/report)")
    parser.add_argument("--k", type=int, default=10, help="K for the coupling figures (one of the probed K)")
    parser.add_argument("--metric", default="coupling/k10", help="metric to correlate with the scores")
    parser.add_argument("--scores", default=None, help="CSV with columns model and/or hub_id and the score")
    parser.add_argument("--score-column", default="benchmark_score")
    parser.add_argument(
        "--x-column", default=None, help="correlate a column of the scores CSV instead of runs"
    )
    args = parser.parse_args(argv)
    if not args.runs and not args.scores:
        parser.error("give run folders, or --scores with --x-column")
    if not args.runs and not args.x_column:
        parser.error("--scores without run folders needs --x-column")
    out = args.out or (str(Path(args.runs[0]) / "report") if args.runs else "report")
    try:
        written = build_report(
            args.runs,
            out,
            k=args.k,
            metric=args.metric,
            scores=args.scores,
            score_column=args.score_column,
            x_column=args.x_column,
        )
    except (ReportInputError, ScoreTableError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print((Path(written["out"]) / "report.md").read_text())
    print(f"report written to {written['out']}")


if __name__ == "__main__":
    main()

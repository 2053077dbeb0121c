"""``alignscope-report``: tables, figures and correlations from the run folders of probe and training sweeps.

Reads run folders (not W&B) and writes a report folder whose ``report.md`` shows every table and links every
file written:

- probe runs (``alignscope-probe``: ``run.json``, ``scalars.json``, ``result/``): ``table.md`` /
  ``table.csv``, every headline metric for each model (and revision), pretrained next to random init (mean
  ± std across prompts) and their ratio; ``figures/`` per model (coupling, block grid, spectra, steps and
  norms, PCA, metrics against checkpoint step for revision sweeps).
- training runs (``alignscope-train``: ``summary.json``, ``probes.jsonl``, ``metrics.json``): a table per
  job, seeds as replicates (mean ± std), the metrics against step per job, and the regression of the final
  validation loss on each metric across jobs (:mod:`alignscope.apps.report_sweep`).
- with ``--scores``: ``correlation.md`` / ``correlation.csv`` and scatter plots, a linear regression of a
  benchmark score on a metric across models (slope, R^2, p-value), and the same for parameter count
  (log10), depth and width as baselines.

A value without meaning (a ratio over ~0, a coupling with one block, a negative coupling at a K that is a
large share of d) is shown as a note (:mod:`alignscope.apps.report_table`).

    alignscope-report multirun/probe/<date>/<time> --out reports/smollm2
    alignscope-report multirun/train/<date>/<time>
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
from alignscope.apps.report_probe import (
    REPORT_METRICS,
    all_figures,
    comparison_rows,
    model_figures,
    revision_figure,
    write_table,
)
from alignscope.apps.report_runs import (
    ReportInputError,
    Run,
    check_k,
    check_metric,
    find_runs,
    latest_pretrained,
)
from alignscope.apps.report_sweep import training_section
from alignscope.apps.report_training import find_training_runs
from alignscope.apps.scores import (
    PAPER_COUPLING_COLUMN,
    PAPER_FIG1A_MODELS,
    PAPER_FIG1A_R2,
    ScoreTable,
    ScoreTableError,
    read_scores,
)

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
    "find_training_runs",
    "latest_pretrained",
    "main",
    "model_figures",
    "regress",
    "revision_figure",
    "run_points",
    "write_correlation",
    "write_table",
]


# --------------------------------------------------------------------------------------------- correlation
def write_correlation(points: list[dict[str, Any]], regs: list[Regression], label_key: str, out: Path) -> str:
    """``correlation.csv``, ``correlation.md`` and one scatter plot per regression; returns the Markdown."""
    from alignscope.apps import plots

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "correlation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "n", "slope", "intercept", "r2", "p_value", "note"])
        for r in regs:
            writer.writerow([r.x_name, r.y_name, r.n, r.slope, r.intercept, r.r2, r.p_value, r.note])
    md = ["| x | y | n | slope | intercept | R^2 | p-value | note |", "|---|---|---|---|---|---|---|---|"]
    md += [
        f"| {r.x_name} | {r.y_name} | {r.n} | {r.slope:.4g} | {r.intercept:.4g} | {r.r2:.3f} | {r.p_value:.2g} "
        f"| {r.note} |"
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


def _paper_reference(table: ScoreTable, score_column: str, regs: list[Regression]) -> list[str]:
    """With a scores CSV that has the paper's own coupling column (``coupling_in_paper``, as
    ``examples/paper_fig1a_scores.csv``): the R^2 the paper reports next to the one of its column and of this
    report's first regression, so a rerun of the paper's Figure 1a can be read against it."""
    if PAPER_COUPLING_COLUMN not in table.columns or not regs:
        return []
    scores = table.path
    paper = read_scores(scores, numeric=[PAPER_COUPLING_COLUMN, score_column])
    own = regress(
        [r.values[PAPER_COUPLING_COLUMN] for r in paper.rows], [r.values[score_column] for r in paper.rows]
    )
    ours = regs[0]
    return [
        f"Against the paper's Figure 1a: the paper reports R^2 = {PAPER_FIG1A_R2:.2f} over "
        f"{PAPER_FIG1A_MODELS} models; its coupling column in this CSV gives R^2 = {own.r2:.2f} over "
        f"{own.n}; here {ours.x_name} gives R^2 = {ours.r2:.2f} over {ours.n}.",
        "",
    ]


def _input_notes(skipped: list[str], unmatched: list[str]) -> list[str]:
    """Markdown lines listing the score rows that were left out, and why."""
    lines = []
    if skipped:
        lines += ["Skipped rows (blank or non-numeric cells):", ""] + [f"- {x}" for x in skipped] + [""]
    if unmatched:
        lines += ["Score rows without a pretrained probe run:", ""] + [f"- {x}" for x in unmatched] + [""]
    return lines


# --------------------------------------------------------------------------------------------- entry point
def _probe_section(runs: list[Run], out: Path, k: int) -> tuple[list[str], dict[str, Any]]:
    """``table.md`` / ``table.csv`` and the per-model figures; the report's Markdown lines."""
    rows = comparison_rows(runs)
    md = write_table(rows, out)
    figs = all_figures(runs, out / "figures", k)
    lines = [
        "## Pretrained against random init ([table.md](table.md), [table.csv](table.csv))",
        "",
        md,
        "## Figures",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figs],
        "",
    ]
    return lines, {"rows": rows, "figures": figs}


def _file_index(out: Path, text: str) -> list[str]:
    """Links to every file under ``out`` that ``text`` does not link yet (``report.md`` itself excluded)."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    missing = [f for f in files if f != "report.md" and f"({f})" not in text]
    return ["## Other files", "", *[f"- [{f}]({f})" for f in missing], ""] if missing else []


def _find_inputs(paths: Sequence[str | Path]) -> tuple[list[Run], list[Any]]:
    """The probe runs and the training runs below ``paths``; refuses paths that hold neither."""
    runs = find_runs(paths) if paths else []
    training = find_training_runs(paths) if paths else []
    if paths and not runs and not training:
        raise FileNotFoundError(
            f"no finished probe runs (run.json + result/) or training runs (summary.json + probes.jsonl) "
            f"below {', '.join(map(str, paths))}"
        )
    return runs, training


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
    runs, training = _find_inputs(paths)
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
    for part, items in ((_probe_section, runs), (training_section, training)):
        if items:
            # with --scores, correlation.md is the score correlation: the training one takes another name
            name = "training_generalization" if scores else "correlation"
            lines, info = part(items, out, k) if part is _probe_section else part(items, out, name)
            sections += lines
            written.update(info)
    if scores:
        regs = correlations(points, x_names, score_column)
        written["regressions"] = regs
        sections += [
            f"## Correlation with {score_column} ({scores}; [correlation.md](correlation.md), "
            "[correlation.csv](correlation.csv))",
            "",
            write_correlation(points, regs, "label", out),
            *_paper_reference(table, score_column, regs),
            *_input_notes(table.skipped, unmatched),
        ]
    text = "\n".join(sections) + "\n"
    (out / "report.md").write_text(text + "\n".join(_file_index(out, text)))
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignscope-report",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "runs", nargs="*", default=[], help="sweep or run folders of alignscope-probe and/or alignscope-train"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report folder; when not given: <first run folder>/report, or ./report without run folders",
    )
    parser.add_argument(
        "--k", type=_positive, default=10, help="K of the coupling figures (one of the probed K)"
    )
    parser.add_argument(
        "--metric", default="coupling/k10", help="scalar of the probe runs to correlate with --scores"
    )
    parser.add_argument("--scores", default=None, help="CSV with a model and/or hub_id column and the score")
    parser.add_argument("--score-column", default="benchmark_score", help="column of --scores to explain")
    parser.add_argument("--x-column", default=None, help="correlate this column of --scores instead of runs")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the report as a W&B run (job type report: tables, figures, the folder as an artifact; "
        "WANDB_MODE, offline when unset)",
    )
    parser.add_argument(
        "--wandb-project", default=None, help="W&B project (default: WANDB_PROJECT or alignscope)"
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit status 2) for inputs that cannot work, before anything is read."""
    if not args.runs and not args.scores:
        parser.error("give run folders, or --scores with --x-column")
    if not args.runs and not args.x_column:
        parser.error("--scores without run folders needs --x-column")
    for path in args.runs:
        if not Path(path).is_dir():
            parser.error(
                f"no such run folder: {path}" if not Path(path).exists() else f"not a folder: {path}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    """The console script; every input error exits with status 2 and one line on stderr."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
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
    except (ReportInputError, ScoreTableError, FileNotFoundError, NotADirectoryError) as err:
        parser.error(" ".join(str(err).split()))
    print((Path(written["out"]) / "report.md").read_text())
    print(f"report written to {written['out']}")
    if args.wandb:
        from alignscope.apps.report_wandb import log_report

        folder = log_report(Path(written["out"]), args.runs, args.wandb_project)
        print(f"W&B run of the report: {folder}" if folder else "W&B: not logged (WANDB_MODE=disabled)")


if __name__ == "__main__":
    main()

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
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignscope.apps.scores import ScoreTable, ScoreTableError, read_scores
from alignscope.probing.result import HEADLINE, ProbeResult

REPORT_METRICS = (
    *HEADLINE,
    "alignment_across/k10",
    "expodistance/step_r2",
    "expodistance/norm_r2",
    "spectra/inv_s1_slope",
    "spectra/inv_s1_r2",
)
"""The headline scalars and the fit qualities, in the report's table."""


class ReportInputError(ValueError):
    """A report setting that does not fit the run folders or scores; the message says what to change."""


@dataclass
class Run:
    """One probe run folder."""

    folder: Path
    info: dict[str, Any]
    scalars: dict[str, float]
    _result: ProbeResult | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return str(self.info["model"])

    @property
    def init(self) -> str:
        return str(self.info["init"])

    @property
    def revision(self) -> str:
        return str(self.info.get("revision") or "")

    @property
    def ks(self) -> list[int]:
        """The probed K values (``result/meta.json``)."""
        return list(json.loads((self.folder / "result" / "meta.json").read_text())["ks"])

    @property
    def result(self) -> ProbeResult:
        if self._result is None:
            self._result = ProbeResult.load(self.folder / "result")
        return self._result


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished probe run (``run.json`` + ``scalars.json`` + ``result/``) below ``paths``."""
    runs = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"no such run folder: {root}")
        for info_path in sorted(root.rglob("run.json")):
            folder = info_path.parent
            if (folder / "scalars.json").is_file() and (folder / "result" / "meta.json").is_file():
                runs.append(
                    Run(
                        folder,
                        json.loads(info_path.read_text()),
                        json.loads((folder / "scalars.json").read_text()),
                    )
                )
    return runs


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
        groups.items(), key=lambda kv: (kv[0][0], _step_of(kv[0][1]), kv[0][1])
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


def _step_of(revision: str) -> int:
    from alignscope.apps.probe_app import revision_step

    return revision_step(revision)


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
def _grid(result: ProbeResult, k: int):
    """Mean over tokens of ``|U_{j,K}^T J_i V_{j,K}|`` for the kept blocks: ``[n, n, K, K]``."""
    from alignscope.core import metrics

    J = result.extras["block_jacobians"]  # [P, n, d, d]
    k = min(k, J.shape[-1])
    grids = []
    for Jp in J:
        U, _, V = metrics.svd(Jp)
        grids.append(torch.einsum("jak,iab,jbl->ijkl", U[..., :k], Jp, V[..., :k]).abs())
    return torch.stack(grids).mean(0)


def model_figures(model: str, by_init: dict[str, Run], out: Path, k: int = 10) -> list[Path]:
    """All per-model figures; returns their paths."""
    from alignscope.apps import plots

    plt = plots._plt()
    results = {init: r.result for init, r in sorted(by_init.items())}
    tag = model.replace("/", "_")
    paths = [
        plots.save(plots.coupling_heatmaps(results, k), out / f"{tag}_coupling_k{k}.png"),
        plots.save(plots.trajectory_pca(results), out / f"{tag}_pca.png"),
    ]
    for init, res in results.items():
        if "block_jacobians" not in res.extras:
            continue
        grid = _grid(res, k)
        grid = (
            grid / grid.diagonal(dim1=0, dim2=1).amax(dim=(0, 1))[:, None, None, None]
        ).numpy()  # row i / s_{i,1}
        n = grid.shape[0]
        blocks = res.meta.get("kept_blocks", list(range(n)))
        fig, axes = plt.subplots(n, n, figsize=(2.2 * n, 2.2 * n), squeeze=False)
        vmax = 1.0
        for i in range(n):
            for j in range(n):
                axes[i, j].imshow(grid[i, j], vmin=0, vmax=vmax, cmap="magma")
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
                if i == n - 1:
                    axes[i, j].set_xlabel(f"bases of block {blocks[j]}", fontsize=8)
                if j == 0:
                    axes[i, j].set_ylabel(f"J of block {blocks[i]}", fontsize=8)
        fig.suptitle(f"{model} ({init}): |U_j^T J_i V_j| / s_1(J_i), top {grid.shape[-1]}")
        paths.append(plots.save(fig, out / f"{tag}_grid_{init}.png"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for init, res in results.items():
        depth = [layer + 1 for layer in res.layers]
        axes[0].plot(depth, res.singular_values[..., 0].mean(0), marker="o", ms=3, label=f"{init} s_1")
        axes[0].plot(
            depth,
            res.singular_values[..., 4].mean(0) if res.singular_values.shape[-1] > 4 else [],
            ls="--",
            label=f"{init} s_5",
        )
        axes[1].plot(depth, res.stable_rank.mean(0), marker="o", ms=3, label=init)
    axes[0].set(
        xlabel="block", ylabel="singular value (mean over tokens)", yscale="log", title="top singular values"
    )
    axes[1].set(xlabel="block", ylabel="stable rank", title="stable rank ||J||_F^2 / s_1^2")
    paths.append(_save_panels(fig, axes, out / f"{tag}_spectra.png"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for init, res in results.items():
        h = res.hidden_states.double()
        steps = (h[:, 1:] - h[:, :-1]).norm(dim=-1).log().mean(0)
        norms = h.norm(dim=-1).log().mean(0)
        axes[0].plot(
            range(1, len(steps) + 1),
            steps,
            marker="o",
            ms=3,
            label=f"{init}: slope {res.step_slope.mean():.3f}, LSS {res.lss.mean():.2f}",
        )
        axes[1].plot(
            range(len(norms)), norms, marker="o", ms=3, label=f"{init}: slope {res.norm_slope.mean():.3f}"
        )
    axes[0].set(xlabel="block l", ylabel="log ||x^l - x^{l-1}||", title="step sizes (expodistance)")
    axes[1].set(xlabel="depth l", ylabel="log ||x^l||", title="norms")
    paths.append(_save_panels(fig, axes, out / f"{tag}_trajectory.png"))
    return paths


def _save_panels(fig, axes, path: Path) -> Path:
    """Legend and grid on every panel, then save."""
    from alignscope.apps import plots

    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.save(fig, path)


def revision_figure(model: str, runs: list[Run], out: Path, metrics: Sequence[str]) -> Path | None:
    """Each metric against checkpoint step, pretrained checkpoints (and random if present)."""
    from alignscope.apps import plots

    stepped = [r for r in runs if r.model == model and r.revision and _step_of(r.revision) >= 0]
    if len({r.revision for r in stepped}) < 2:
        return None
    plt = plots._plt()
    names = [m for m in metrics if any(m in r.scalars for r in stepped)]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for init in ("pretrained", "random"):
            pts = sorted(
                (_step_of(r.revision), r.scalars.get(name, float("nan"))) for r in stepped if r.init == init
            )
            if pts:
                ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", ms=3, label=init)
        ax.set(title=name, xlabel="checkpoint step + 1", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return plots.save(fig, out / f"{model.replace('/', '_')}_vs_step.png")


# --------------------------------------------------------------------------------------------- correlation
@dataclass
class Regression:
    """Least-squares ``y ~ slope * x + intercept`` over ``n`` points, with ``R^2`` and the slope's p-value."""

    x_name: str
    y_name: str
    n: int
    slope: float
    intercept: float
    r2: float
    p_value: float


def regress(x: Sequence[float], y: Sequence[float], x_name: str = "x", y_name: str = "y") -> Regression:
    """Linear regression (scipy.stats.linregress); NaN statistics with fewer than 3 points."""
    from scipy import stats

    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    if len(x) < 3:
        nan = float("nan")
        return Regression(x_name, y_name, len(x), nan, nan, nan, nan)
    fit = stats.linregress(x, y)
    return Regression(
        x_name,
        y_name,
        len(x),
        float(fit.slope),
        float(fit.intercept),
        float(fit.rvalue**2),
        float(fit.pvalue),
    )


def correlations(points: list[dict[str, Any]], x_names: Sequence[str], y_name: str) -> list[Regression]:
    """One regression of ``y_name`` on each of ``x_names`` over the points that have both."""
    out = []
    for name in x_names:
        pts = [(p[name], p[y_name]) for p in points if _finite(p.get(name)) and _finite(p.get(y_name))]
        out.append(regress([a for a, _ in pts], [b for _, b in pts], name, y_name))
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def write_correlation(points: list[dict[str, Any]], regs: list[Regression], label_key: str, out: Path) -> str:
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
    plt = plots._plt()
    for r in regs:
        pts = [p for p in points if _finite(p.get(r.x_name)) and _finite(p.get(r.y_name))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        xs, ys = [p[r.x_name] for p in pts], [p[r.y_name] for p in pts]
        ax.scatter(xs, ys, s=18)
        for p in pts:
            ax.annotate(
                str(p[label_key]),
                (p[r.x_name], p[r.y_name]),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        if math.isfinite(r.slope):
            lo, hi = min(xs), max(xs)
            ax.plot(
                [lo, hi],
                [r.slope * lo + r.intercept, r.slope * hi + r.intercept],
                color="C1",
                label=f"R^2 = {r.r2:.2f}, p = {r.p_value:.2g}",
            )
            ax.legend(fontsize=8)
        ax.set(xlabel=r.x_name, ylabel=r.y_name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        plots.save(fig, out / f"scatter_{r.x_name.replace('/', '_')}.png")
    return text


def latest_pretrained(runs: list[Run]) -> dict[str, Run]:
    """The pretrained run of each model at its latest checkpoint revision."""
    latest: dict[str, Run] = {}
    for r in runs:
        if r.init == "pretrained" and (
            r.model not in latest or _step_of(r.revision) >= _step_of(latest[r.model].revision)
        ):
            latest[r.model] = r
    return latest


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


def check_k(runs: list[Run], k: int) -> None:
    """``k`` must be among the probed K of every run (the coupling figures show ``m_K`` at that K)."""
    lacking = [r for r in runs if k not in r.ks]
    if lacking:
        common = sorted(set.intersection(*(set(r.ks) for r in runs)))
        choice = f"choose one of {common}" if common else "the runs share no K: report them separately"
        raise ReportInputError(
            f"--k {k} is not among the probed K of {len(lacking)} run(s), e.g. {lacking[0].folder} "
            f"(K = {lacking[0].ks}): {choice}"
        )


def check_metric(runs: list[Run], metric: str) -> None:
    """``metric`` must be a scalar of at least one of ``runs``."""
    names = sorted({name for r in runs for name in r.scalars})
    if metric not in names:
        near = difflib.get_close_matches(metric, names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, near))}?" if near else f"scalars: {', '.join(names)}"
        raise ReportInputError(f"--metric {metric!r} is not a scalar of the pretrained runs ({hint})")


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
    if scores:
        if x_column:
            table = read_scores(scores, numeric=[x_column, score_column])
            points = [
                {"label": row.label, x_column: row.values[x_column], score_column: row.values[score_column]}
                for row in table.rows
            ]
            x_names, unmatched = [x_column], []
        else:
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
            x_names = [metric, "log10_params", "depth", "width"]
        written["skipped"], written["unmatched"] = table.skipped, unmatched
    out.mkdir(parents=True, exist_ok=True)
    if runs:
        rows = comparison_rows(runs)
        written["rows"] = rows
        sections += ["## Pretrained against random init", "", write_table(rows, out)]
        figs = []
        for model in sorted({r.model for r in runs}):
            by_init = {}
            for r in runs:
                if r.model == model and (
                    r.init not in by_init or _step_of(r.revision) >= _step_of(by_init[r.init].revision)
                ):
                    by_init[r.init] = r
            figs += model_figures(model, by_init, out / "figures", k=k)
            fig = revision_figure(model, runs, out / "figures", REPORT_METRICS)
            if fig is not None:
                figs.append(fig)
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

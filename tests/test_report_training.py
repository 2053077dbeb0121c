"""The report on training sweeps (run folders written with the monitor's own writers), its notes for
meaningless values, report.md's links, and the command line's help and usage errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from alignscope.apps.monitor_summary import summarize
from alignscope.apps.report import build_report, main
from alignscope.apps.report_table import Note, RunContext, ratio_cell, value_cell
from alignscope.apps.run_folder import write_json, write_records
from alignscope.probing.result import HEADLINE

SEEDS = {"0": ("n_layer=2", 0), "1": ("n_layer=2", 1), "2": ("n_layer=4", 0), "3": ("n_layer=4", 1)}


def _write_training_run(folder: Path, setting: str, seed: int, rng: np.random.Generator) -> None:
    """A run folder as alignscope-train writes it: probes.jsonl, summary.json, metrics.json, .hydra/."""
    history = []
    for step in (0, 5, 10):
        rec = {"step": step, **{m: float(rng.uniform(0.1, 1.0)) for m in HEADLINE}}
        rec.update({f"spectra/s1/block_{b:02d}": 1.0 for b in range(2)})
        history.append(rec)
    write_records(folder / "probes.jsonl", history)
    write_json(folder / "summary.json", summarize(history, 1.0))
    write_json(folder / "metrics.json", {"val/loss": float(rng.uniform(4.0, 6.0)), "global_step": 10})
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"model.config.{setting}", f"seed={seed}"])
    )
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-sweep")
    rng = np.random.default_rng(0)
    for job, (setting, seed) in SEEDS.items():
        _write_training_run(root / job, setting, seed, rng)
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report([sweep], out), out


def _summaries(sweep: Path) -> dict[str, dict]:
    return {job: json.loads((sweep / job / "summary.json").read_text()) for job in SEEDS}


def test_job_table_equals_each_summary(sweep, report):
    _, out = report
    with open(out / "training_jobs.csv") as fh:
        rows = list(csv.DictReader(fh))
    summaries = _summaries(sweep)
    for row in rows:
        job = row["job"].split()[0]
        if row["metric"] == "val/loss":
            loss = json.loads((sweep / job / "metrics.json").read_text())["val/loss"]
            assert float(row["final"]) == pytest.approx(loss)
            continue
        entry = summaries[job][row["metric"]]
        assert [float(row[k]) for k in ("init", "final", "change")] == pytest.approx(
            [entry["init"], entry["final"], entry["change"]]
        )
    assert len(rows) == len(SEEDS) * (len(HEADLINE) + 1)
    md = (out / "training_jobs.md").read_text()
    assert md.count("### Job ") == 4 and "model.config.n_layer=4" in md


def test_seeds_are_replicates(sweep, report):
    _, out = report
    with open(out / "training_replicates.csv") as fh:
        rows = {(r["setting"], r["metric"]): r for r in csv.DictReader(fh)}
    summaries = _summaries(sweep)
    assert {s for s, _ in rows} == {"model.config.n_layer=2", "model.config.n_layer=4"}
    finals = [summaries[j]["coupling/k10"]["final"] for j in ("2", "3")]
    row = rows[("model.config.n_layer=4", "coupling/k10")]
    assert row["seeds"] == "2"
    assert float(row["final_mean"]) == pytest.approx(np.mean(finals))
    assert float(row["final_std"]) == pytest.approx(np.std(finals, ddof=1))
    assert " ± " in (out / "training_replicates.md").read_text()


def test_val_loss_correlation_matches_scipy(sweep, report):
    written, _ = report
    summaries = _summaries(sweep)
    loss = [json.loads((sweep / j / "metrics.json").read_text())["val/loss"] for j in SEEDS]
    regs = {r.x_name: r for r in written["regressions_val_loss"]}
    assert set(regs) == set(HEADLINE)
    for metric in ("coupling/k10", "lss/mean"):
        x = [summaries[j][metric]["final"] for j in SEEDS]
        fit = stats.linregress(x, loss)
        slope, intercept = np.polyfit(x, loss, 1)
        r = regs[metric]
        assert r.n == 4 and r.slope == pytest.approx(slope) and r.intercept == pytest.approx(intercept)
        assert r.r2 == pytest.approx(np.corrcoef(x, loss)[0, 1] ** 2) and r.p_value == pytest.approx(
            fit.pvalue
        )


def test_metrics_vs_step_figure_has_a_line_per_job(sweep, tmp_path):
    from alignscope.apps.report_figures import sweep_metrics_vs_step
    from alignscope.apps.report_training import find_training_runs

    runs = find_training_runs([sweep])
    jobs = {r.job: (int(r.setting[-1]), r.records) for r in runs}
    fig = sweep_metrics_vs_step(jobs, ["coupling/k10", "lss/mean"])
    ax = fig.axes[0]
    assert ax.get_title() == "coupling/k10" and len(ax.lines) == 4
    assert list(ax.lines[2].get_ydata()) == [r["coupling/k10"] for r in runs[2].records]
    assert (
        ax.lines[0].get_color() == ax.lines[1].get_color() != ax.lines[2].get_color()
    )  # replicates share it


def test_report_md_links_every_file(report):
    _, out = report
    text = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"report.md"}
    assert files <= set(links)
    assert all((out / link).is_file() for link in links)
    assert "figures/training_metrics_vs_step.png" in files


def test_near_zero_denominator_is_a_note():
    cell = ratio_cell(0.3, -9.1e-11, "random")
    assert isinstance(cell, Note) and "~0" in str(cell)
    assert ratio_cell(0.3, 0.1) == pytest.approx(3.0)


def test_single_block_and_negative_coupling_are_notes():
    one = RunContext(blocks=1, d=128)
    assert "1 probed block" in str(value_cell("coupling/k10", math.nan, one))
    many = RunContext(blocks=4, d=128, scalars={"k_effective/k50": 50.0})
    assert "K=50 is 39% of d=128" in str(value_cell("coupling/k50", -0.2, many))
    assert value_cell("coupling/k50", 0.2, many) == 0.2 and value_cell("lss/mean", -1.0, many) == -1.0


def test_negative_coupling_in_a_job_table_is_a_note(tmp_path):
    folder = tmp_path / "sweep" / "0"
    history = [
        {"step": s, "coupling/k30": v, "spectra/s1/block_00": 1.0, "spectra/s1/block_01": 1.0}
        for s, v in ((0, -0.7), (5, 0.2))
    ]
    write_records(folder / "probes.jsonl", history)
    write_json(folder / "summary.json", summarize(history, 1.0))
    write_json(folder / "fingerprint.json", {"model": {"config": {"n_embd": 32}}})
    build_report([tmp_path / "sweep"], tmp_path / "r")
    md = (tmp_path / "r" / "training_jobs.md").read_text()
    assert "n/a: negative, K=30 is 94% of d=32" in md and "-0.7" not in md


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (
        ("--out", "None"),
        ("--k", "10"),
        ("--metric", "coupling/k10"),
        ("--scores", "None"),
        ("--score-column", "benchmark_score"),
        ("--x-column", "None"),
    ):
        assert re.search(re.escape(option) + r"\b.*?\(default: " + re.escape(default) + r"\)", text), option


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/no/such/folder"], "no such run folder: /no/such/folder"),
        (["--k", "zero"], "invalid int value: 'zero'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err_lines) == 1 and message in err_lines[0]


def test_folder_without_runs_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    assert "no finished probe runs" in capsys.readouterr().err


def test_report_logged_to_wandb_as_a_run_with_an_artifact(sweep, tmp_path, monkeypatch, capsys):
    """--wandb: one offline run of job type report, grouped by the sweep, with the tables as W&B tables,
    the figures as images and the report folder as an artifact of type report."""
    from alignscope.apps.report import main
    from wandb_records import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "rep"
    main([str(sweep), "--out", str(out), "--wandb", "--wandb-project", "reports"])
    run = read_run(next((out / "wandb").glob("offline-run-*")))
    assert run.job_type == "report" and run.name == "report-rep" and run.group == sweep.name
    assert run.project == "reports" and run.exit_code == 0
    keys = run.history_keys()
    assert any(k.startswith("report/training_jobs") for k in keys)
    assert any(k.startswith("report/figures/training_metrics_vs_step") for k in keys)
    assert ("report-rep", "report") in run.artifacts

"""The paper's experiments as recipes: experiment=paper_fig1a and experiment=pythia_dynamics compose, cover the
paper's models and revisions, and dry-run offline end to end (probe app, then the report) on tiny local
stand-ins for the hub models."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alignscope.apps.config import config_dir
from alignscope.apps.report import build_report
from conftest import save_tiny_local_model

PAPER_SCORES = Path(__file__).resolve().parents[1] / "examples" / "paper_fig1a_scores.csv"


def _compose(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("probe_app", overrides=list(overrides), return_hydra_config=hydra_config)


def _swept(experiment: str, key: str) -> list[str]:
    cfg = _compose(f"experiment={experiment}", hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    return [v.strip() for v in str(cfg.hydra.sweeper.params[key]).split(",")]


def test_paper_fig1a_sweeps_every_model_of_the_scores_table_with_the_released_conventions():
    models = _swept("paper_fig1a", "model")
    assert len(models) == 28 == len(set(models))
    hub_ids = {}
    for name in models:
        cfg = _compose("experiment=paper_fig1a", f"model={name}")
        assert (cfg.model.name, cfg.model.source, cfg.model.init) == (name, "hub", "pretrained")
        assert cfg.probe.include_final_norm and cfg.probe.linearization == "drop_last"  # probe=paper_code
        hub_ids[cfg.model.hub_id] = name
    with open(PAPER_SCORES) as f:
        scored = [row["hub_id"] for row in csv.DictReader(f)]
    assert len(scored) == 25 and set(scored) <= set(hub_ids)


def test_pythia_dynamics_sweeps_log_spaced_revisions_from_step0_to_step143000():
    revisions = _swept("pythia_dynamics", "model.revision")
    steps = [int(r.removeprefix("step")) for r in revisions]
    assert steps[0] == 0 and steps[-1] == 143000 and steps == sorted(steps) and len(steps) >= 12
    cfg = _compose("experiment=pythia_dynamics", f"model.revision={revisions[-1]}")
    assert cfg.model.hub_id == "EleutherAI/pythia-1.4b"


def _dry_run(root: Path, jobs: list[tuple[str, list[str]]], seeds: list[int]) -> Path:
    """Each job of a recipe, run by the probe app on a tiny local model instead of the hub model."""
    from alignscope.apps.probe_app import run

    for job, (experiment_overrides, seed) in enumerate(zip(jobs, seeds)):
        local = save_tiny_local_model(root / f"model{seed}", seed=seed)
        run(
            _compose(
                f"paths.run_dir={root / 'sweep' / str(job)}",
                "logger=csv",
                *experiment_overrides,
                "model.source=local",
                f"model.path={local}",
                "model.dtype=float32",
                "prompts.num=2",
            )
        )
    return root / "sweep"


@pytest.mark.slow
def test_paper_fig1a_dry_runs_offline_and_the_report_prints_r2_next_to_the_papers(tmp_path):
    models = ["gpt2", "phi_2", "qwen2_7b", "gemma_7b"]
    jobs = [["experiment=paper_fig1a", f"model={m}"] for m in models]
    sweep = _dry_run(tmp_path, jobs, seeds=[1, 2, 3, 4])
    written = build_report([sweep], tmp_path / "report", scores=str(PAPER_SCORES))
    reg = next(r for r in written["regressions"] if r.x_name == "coupling/k10")
    assert reg.n == 4  # the four runs joined to their rows by hub id
    assert len(written["unmatched"]) == 21
    text = (tmp_path / "report" / "report.md").read_text()
    assert "the paper reports R^2 = 0.80 over 28 models" in text
    assert "its coupling column in this CSV gives R^2 = 0.78 over 25" in text
    assert f"here coupling/k10 gives R^2 = {reg.r2:.2f} over 4" in text


@pytest.mark.slow
def test_pythia_dynamics_dry_runs_offline_and_the_report_draws_coupling_over_training(tmp_path):
    revisions = _swept("pythia_dynamics", "model.revision")[::7]  # step0, step1000, step143000
    jobs = [["experiment=pythia_dynamics", f"model.revision={r}"] for r in revisions]
    sweep = _dry_run(tmp_path, jobs, seeds=[1, 2, 3])
    written = build_report([sweep], tmp_path / "report", k=10)
    assert any(p.name == "pythia_1.4b_vs_step.png" for p in written["figures"])
    rows = [r for r in written["rows"] if r["metric"] == "coupling/k10"]
    assert [r["revision"] for r in rows] == revisions

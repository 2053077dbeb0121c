"""Coupling against generalization in a training sweep (correlation.md / .json, scatter, within-run r), the
monitor's val/loss in its probe records, the recipe and data.max_train_sequences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats
from transformers import GPT2Config, GPT2LMHeadModel

from alignscope import ProbeSettings, probe
from alignscope.apps.callback import AlignmentMonitor
from alignscope.apps.config import config_dir
from alignscope.apps.correlation import correlations
from alignscope.apps.data import BPETokenizer, CausalLMDataModule, StdlibCorpus
from alignscope.apps.monitor_summary import summarize
from alignscope.apps.report import build_report
from alignscope.apps.report_generalization import BASELINES, job_points, scatter, write_generalization
from alignscope.apps.report_training import find_training_runs
from alignscope.apps.resumed_probes import probe_folder
from alignscope.apps.run_folder import write_json, write_records
from alignscope.probing.result import HEADLINE
from test_callback import PlainLM, loaders, quiet_trainer

SIZES = [(2, 32), (3, 32), (2, 48), (4, 32), (3, 48)]
"""(blocks, width) of each job's model."""
STEPS = (0, 10, 20, 30)
VALIDATED = {0: (10, 20, 30), 1: (10, 20, 30), 2: (20, 30), 3: (10, 20, 30), 4: (10, 20, 30)}
"""The probe steps at which each job's validation ran (job 2 has 2: no within-run r)."""


def _final_probe(folder: Path, n_layer: int, n_embd: int) -> int:
    """Probe a random-init GPT-2 of this size and save it where the monitor saves its last probe."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=64, n_positions=16)
    model = GPT2LMHeadModel(config).eval()
    result = probe(model, torch.randint(0, 64, (1, 6)), settings=ProbeSettings(ks=[2]))
    result.meta["step"] = STEPS[-1]
    result.save(probe_folder(folder, STEPS[-1]))
    return sum(p.numel() for p in model.parameters())


def _write_job(folder: Path, job: int, rng: np.random.Generator) -> int:
    """A run folder as alignscope-train writes it; returns the model's parameter count."""
    history = []
    for step in STEPS:
        rec = {"step": step, **{m: float(rng.uniform(0.1, 1.0)) for m in HEADLINE}}
        if step in VALIDATED[job]:
            rec["val/loss"] = float(rng.uniform(3.0, 6.0))
        history.append(rec)
    write_records(folder / "probes.jsonl", history)
    write_json(folder / "summary.json", summarize(history, 1.0))
    write_json(folder / "metrics.json", {"val/loss": float(rng.uniform(3.0, 6.0)), "global_step": 30})
    (folder / ".hydra").mkdir(parents=True)
    overrides = [f"+generalization=v{job}", f"seed={job % 2}", "experiment=generalization"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": job % 2}))
    return _final_probe(folder, *SIZES[job])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, list[int]]:
    root = tmp_path_factory.mktemp("gen-sweep")
    rng = np.random.default_rng(3)
    params = [_write_job(root / str(job), job, rng) for job in range(len(SIZES))]
    return root, params


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gen-report")
    build_report([sweep[0]], out)
    return json.loads((out / "correlation.json").read_text(), parse_constant=_no_nan), out


def _no_nan(name: str) -> None:
    raise AssertionError(f"correlation.json holds {name}: not JSON")


def _columns(root: Path, params: list[int]) -> dict[str, list[float]]:
    jobs = [root / str(j) for j in range(len(SIZES))]
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    cols = {m: [s[m]["final"] for s in summaries] for m in HEADLINE}
    cols["val/loss"] = [json.loads((j / "metrics.json").read_text())["val/loss"] for j in jobs]
    cols["log10_params"] = [math.log10(p) for p in params]
    cols["depth"] = [float(d) for d, _ in SIZES]
    cols["width"] = [float(w) for _, w in SIZES]
    return cols


def test_across_jobs_match_scipy_and_numpy(sweep, report):
    data, _ = report
    cols = _columns(*sweep)
    rows = {r["x"]: r for r in data["across_jobs"]}
    for name in ("coupling/k10", "lss/mean", "log10_params", "depth", "width"):
        x, y = cols[name], cols["val/loss"]
        fit = stats.linregress(x, y)
        slope, intercept = np.polyfit(x, y, 1)
        row = rows[name]
        assert row["n"] == len(SIZES) and row["y"] == "val/loss"
        assert row["slope"] == pytest.approx(slope) and row["intercept"] == pytest.approx(intercept)
        assert row["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
        assert row["r2"] == pytest.approx(fit.rvalue**2) and row["p_value"] == pytest.approx(fit.pvalue)


def test_coupling_first_then_metrics_then_baselines(sweep, report):
    data, out = report
    order = [r["x"] for r in data["across_jobs"]]
    assert order == ["coupling/k10", *[m for m in HEADLINE if m != "coupling/k10"], *BASELINES]
    assert [r["kind"] for r in data["across_jobs"]][-3:] == ["baseline"] * 3
    points = {p["job"].split()[0]: p for p in data["points"]}
    for job, (depth, width) in enumerate(SIZES):
        p = points[str(job)]
        assert (p["depth"], p["width"]) == (depth, width)
        assert p["log10_params"] == pytest.approx(math.log10(sweep[1][job]))
    md = (out / "correlation.md").read_text()
    assert md.index("| coupling/k10 |") < md.index("| lss/mean |") < md.index("| log10_params |")
    assert "[correlation.json](correlation.json)" in (out / "report.md").read_text()


def test_json_schema(report):
    data, _ = report
    assert set(data) == {"y", "y_unit", "across_jobs", "within_run", "points"}
    assert (data["y"], data["y_unit"]) == ("val/loss", "nats/token")
    keys = {"x", "y", "n", "slope", "intercept", "r", "r2", "p_value", "kind"}
    assert all(set(r) == keys for r in data["across_jobs"])
    assert set(data["within_run"]) == {"x", "y", "jobs"}
    assert all(set(j) == {"job", "label", "n", "r", "steps"} for j in data["within_run"]["jobs"])
    assert all(
        {"label", "job", "folder", "val/loss", "coupling/k10", *BASELINES} <= set(p) for p in data["points"]
    )


def test_within_run_r_over_the_validated_probe_steps(sweep, report):
    data, out = report
    jobs = {j["job"].split()[0]: j for j in data["within_run"]["jobs"]}
    for job, steps in VALIDATED.items():
        recs = [json.loads(x) for x in (sweep[0] / str(job) / "probes.jsonl").read_text().splitlines()]
        pairs = [(r["coupling/k10"], r["val/loss"]) for r in recs if "val/loss" in r]
        row = jobs[str(job)]
        assert row["steps"] == list(steps) and row["n"] == len(pairs)
        if len(pairs) < 3:
            assert row["r"] is None
        else:
            assert row["r"] == pytest.approx(np.corrcoef(*zip(*pairs))[0, 1])
    assert "n/a: fewer than 3 steps" in (out / "correlation.md").read_text()


def test_scatter_has_a_labelled_point_per_job_and_units(sweep, report):
    _, out = report
    assert (out / "figures" / "correlation_coupling_k10_vs_val_loss.png").is_file()
    points = job_points(find_training_runs([sweep[0]]))
    reg = correlations(points, ["coupling/k10"], "val/loss")[0]
    ax = scatter(points, reg).axes[0]
    assert ax.get_xlabel() == "final coupling/k10 (1 - m_10^2, dimensionless)"
    assert ax.get_ylabel() == "final validation loss (nats/token)"
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"{j} +generalization=v{j} seed={j % 2}" for j in range(len(SIZES))]
    offsets = ax.collections[0].get_offsets()
    assert np.allclose(offsets[:, 0], [p["coupling/k10"] for p in points])
    assert np.allclose(offsets[:, 1], [p["val/loss"] for p in points])


def test_with_scores_the_training_files_take_another_name(sweep, tmp_path):
    runs = find_training_runs([sweep[0]])
    write_generalization(runs, tmp_path, "training_generalization")
    assert (tmp_path / "training_generalization.json").is_file() and not (
        tmp_path / "correlation.md"
    ).exists()


class ValLossLM(PlainLM):
    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val/loss", self.net(input_ids=ids, labels=ids).loss)


def test_monitor_records_val_loss_at_validated_probe_steps(tmp_path):
    monitor = AlignmentMonitor(
        every_n_steps=2,
        log_spaced=False,
        num_prompts=2,
        prompt_length=6,
        dirpath=str(tmp_path),
        figures=False,
    )
    losses = {}

    class Spy(ValLossLM):
        def on_validation_epoch_end(self):
            losses[self.trainer.global_step] = float(self.trainer.callback_metrics["val/loss"])

    trainer = quiet_trainer(
        max_steps=6, val_check_interval=4, check_val_every_n_epoch=None, callbacks=[monitor]
    )
    train, val = loaders()
    trainer.fit(Spy(), train, val)
    recs = [json.loads(x) for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 2, 4, 6]
    assert [r["step"] for r in recs if "val/loss" in r] == [4]  # validation ran at step 4 only
    assert recs[2]["val/loss"] == pytest.approx(losses[4])
    assert monitor.history[2]["val/loss"] == recs[2]["val/loss"]


def test_recipe_composes_twelve_jobs():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=generalization"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        variants = params["+generalization"].split(",")
        assert len(variants) * len(str(params["seed"]).split(",")) >= 12
        for name, key, value in (
            ("depth2", "model.config.n_layer", 2),
            ("width64", "model.config.n_embd", 64),
            ("lr_low", "optim.lr", 3e-4),
            ("steps_short", "trainer.max_steps", 150),
            ("data_small", "data.max_train_sequences", 512),
        ):
            assert name in variants
            one = compose("train", overrides=["experiment=generalization", f"+generalization={name}"])
            base = compose("train", overrides=["experiment=generalization", "+generalization=base"])
            assert OmegaConf.select(one, key) == value != OmegaConf.select(base, key)
        quick = compose(
            "train",
            overrides=["experiment=generalization", "+generalization=steps_short", "trainer.max_steps=50"],
        )
        assert quick.trainer.max_steps == 50 and quick.logger.csv is not None


def test_max_train_sequences_keeps_tokenizer_and_validation(tmp_path):
    kwargs = dict(
        corpus=StdlibCorpus(max_files=20),
        tokenizer=BPETokenizer(vocab_size=300),
        seq_len=16,
        cache_dir=str(tmp_path),
    )
    full, small = CausalLMDataModule(**kwargs), CausalLMDataModule(**kwargs, max_train_sequences=7)
    full.prepare()
    small.prepare()
    assert len(small.train_tokens) == 7 and len(full.train_tokens) > 7
    rows = {tuple(r) for r in full.train_tokens.tolist()}
    assert all(tuple(r) in rows for r in small.train_tokens.tolist())
    assert np.array_equal(small.val_tokens, full.val_tokens) and small.unigram_loss == full.unigram_loss
    with pytest.raises(ValueError, match="max_train_sequences"):
        CausalLMDataModule(**kwargs, max_train_sequences=0)

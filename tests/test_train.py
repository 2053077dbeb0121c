"""The training app: real configs composed, short fits, W&B offline, multirun, resume, bad settings."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alignscope.apps.config import config_dir

SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("alignscope-cache"))


def compose_train(run_dir: Path, cache_dir: str, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "train", overrides=[*SMOKE, f"paths.run_dir={run_dir}", f"data.cache_dir={cache_dir}", *overrides]
        )


def jsonl_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "probes.jsonl").read_text().splitlines()]


def test_short_fit_with_csv_logger(tmp_path, cache_dir, caplog):
    from alignscope.apps.train import train

    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="alignscope"):
        final = train(compose_train(run, cache_dir, "logger=csv"))
    assert final["global_step"] == 12
    steps = jsonl_steps(run)
    assert steps == [0, 1, 2, 4, 5, 10, 12]  # step 0, log-spaced below 5, every 5, end of fit
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("alignscope")]
    probed = [x for x in lines if x.startswith("alignment probe at step ")]  # one line per probe, in order
    assert [int(x.split("step ")[1].split(":")[0]) for x in probed] == steps
    assert all(re.search(r": \d+\.\d s; coupling/k10 -?\d", x) for x in probed), probed
    (table,) = [x for x in lines if x.startswith("alignment monitor summary:")]
    assert "coupling/k10" in table and "step 12" in table
    assert any(x.startswith("val/loss ") and "unigram baseline" in x for x in lines)
    with open(run / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]) for r in rows if r.get("align/coupling/k10")}
    assert {0, 12} <= logged and logged == set(steps)
    assert "align/spectra/s1/block_01" in rows[0]
    for step in steps:
        assert (run / "probes" / f"step_{step:07d}" / "tensors.safetensors").is_file()
    for name in ("coupling_k10", "metrics_vs_step", "trajectories_pca"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000
    # ks="auto" at d = 32: K = 30 and 50 are left out (above d / 4), so no figures for them
    assert not (run / "figures" / "coupling_k30.png").exists()
    assert (run / "figures" / "coupling_distance_k10.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert "train/loss" not in records[0]  # the loss at each probe after step 0
    assert all("train/loss" in r for r in records[1:])
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (monitor,) = [v for k, v in state.items() if k.startswith("AlignmentMonitor")]
    # val_check_interval 6; the checkpoint of step 12 is written before that step's validation
    assert [v["step"] for v in monitor["val_losses"]] == [6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init_step"] == 0 and summary["final_step"] == 12
    c = summary["coupling/k10"]
    assert c["change"] == pytest.approx(c["final"] - c["init"])
    assert "val/loss" in final and final["data/unigram_loss"] > 0


def test_wandb_offline_run_has_history(tmp_path, cache_dir):
    from alignscope.apps.train import train

    run = tmp_path / "run"
    train(compose_train(run, cache_dir, "logger=wandb", "group=unit-test"))
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    from conftest import wandb_history_bytes

    blob = wandb_history_bytes(runs[0], (b"align/coupling/k10", b"train/loss", b"unit-test"))
    assert b"align/coupling/k10" in blob and b"train/loss" in blob and b"unit-test" in blob
    assert (runs[0] / "files" / "media").is_dir()  # figures logged as wandb.Image


def _run_cli(args: list[str], cache_dir: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ALIGNSCOPE_CACHE": cache_dir,
        "WANDB_SILENT": "true",
        "TRANSFORMERS_VERBOSITY": "warning",
    }
    out = subprocess.run(
        [sys.executable, "-m", "alignscope.apps.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_two_job_multirun(tmp_path, cache_dir, launcher):
    sweep = tmp_path / "sweep"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    out = _run_cli(
        ["-m", *SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep}", "trainer.max_steps=4", *extra], cache_dir
    )
    for noise in ("loss_type=None", "LeafSpec", "_token_id must be"):  # warnings the apps caused or silence
        assert noise not in out.stderr, out.stderr[-3000:]
    if launcher == "basic":  # both jobs' lines reach this process's console, each once
        assert (out.stdout + out.stderr).count("`Trainer.fit` stopped: `max_steps=4` reached.") == 2
    groups = set()
    for job in ("0", "1"):
        run = sweep / job
        assert jsonl_steps(run)[0] == 0 and (run / "summary.json").is_file()
        log = (run / "train.log").read_text()  # the job's log file holds the result lines and tables
        assert "alignment probe at step 0:" in log and "alignment monitor summary:" in log
        assert "`Trainer.fit` stopped" in log
        (wandb_run,) = (run / "wandb").glob("offline-run-*")
        from conftest import wandb_history_bytes

        blob = wandb_history_bytes(wandb_run, (b"align/coupling/k10",))
        assert b"align/coupling/k10" in blob
        groups.add(f"train-{sweep.parent.name}-{sweep.name}".encode() in blob)
    assert groups == {True}  # both jobs in the group named after the sweep


def test_resume_continues_the_trajectory(tmp_path, cache_dir):
    from alignscope.apps.train import train

    run = tmp_path / "run"
    train(compose_train(run, cache_dir, "logger=csv", "trainer.max_steps=6"))
    assert jsonl_steps(run) == [0, 1, 2, 4, 5, 6]
    ckpt = run / "checkpoints" / "last.ckpt"
    train(compose_train(run, cache_dir, "logger=csv", f"ckpt_path={ckpt}"))
    steps = jsonl_steps(run)
    assert steps == sorted(set(steps))  # no duplicates, in order
    # the same trajectory as an uninterrupted run (the end-of-fit probe at step 6 was not in the checkpoint)
    assert steps == [0, 1, 2, 4, 5, 10, 12]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["callbacks.alignment_monitor.every_n_steps=0"], "every_n_steps must be a positive integer"),
        (["probe.ks=[]"], "ks is empty"),
        (["probe.tokens=first"], "tokens must be 'last', 'all'"),
        (["data=text_files", "data.corpus.paths=[/nonexistent/**/*.txt]"], "empty corpus: no files match"),
        (["data.seq_len=64", "model.config.n_positions=32"], "beyond the model's context of 32"),
        (["data.seq_len=4000"], "corpus is too small for seq_len=4000|beyond the model's context"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, cache_dir, overrides, match):
    from alignscope.apps.train import train

    with pytest.raises(ValueError, match=match):
        train(compose_train(tmp_path / "run", cache_dir, "logger=csv", *overrides))
    assert not (tmp_path / "run" / "probes.jsonl").exists()


def test_fine_tune_a_pretrained_model_from_a_local_path(tmp_path, cache_dir):
    from alignscope.apps.train import train
    from alignscope.models.tiny import tiny_model

    local = tmp_path / "pretrained"
    tiny_model("gpt2", vocab_size=600, n_positions=64).save_pretrained(local)
    run = tmp_path / "run"
    final = train(
        compose_train(
            run,
            cache_dir,
            "logger=csv",
            "model=local",
            f"model.path={local}",
            "trainer.max_steps=2",
        )
    )
    assert final["global_step"] == 2 and jsonl_steps(run) == [0, 1, 2]


def test_wandb_run_is_finished_when_training_fails(tmp_path, cache_dir):
    import wandb

    from alignscope.apps.train import train

    with pytest.raises(Exception, match="precision"):
        train(compose_train(tmp_path / "run", cache_dir, "logger=wandb", "trainer.precision=bogus"))
    assert wandb.run is None
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny_llama"],
        ["model=tiny_neox"],
        ["model=hf"],
        ["trainer=gpu"],
        ["trainer=ddp"],
        ["logger=none"],
        ["logger=csv"],
        ["data=text_files", "data.corpus.paths=[a.txt]"],
        ["data=hf"],
        ["experiment=depth_sweep"],
        ["experiment=smoke"],
    ],
)
def test_every_config_option_composes(tmp_path, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.run_dir={tmp_path}"])
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["_target_"] == "alignscope.models.load_model"
    assert "_target_" in resolved["trainer"] and "_target_" in resolved["data"]


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_neox"])
def test_model_options_build_and_probe(tmp_path, name):
    import torch
    from hydra.utils import instantiate

    from alignscope import probe

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"paths.run_dir={tmp_path}"])
    model = instantiate(cfg.model)(vocab_size=512, token_ids={"eos_token_id": 0})
    assert model.config.vocab_size == 512 and model.config.alignscope_init_seed == 0
    res = probe(model, torch.randint(0, 512, (1, 8)), ks=(10,))
    assert res.coupling[10].shape == (1, 4, 4)

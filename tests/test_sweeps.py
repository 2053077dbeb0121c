"""Sweeps: the submitit_local launcher gives the basic launcher's numbers, a rerun sweep skips finished jobs
(and still refuses or recomputes changed ones), and one GPU per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignscope.apps.report import find_runs
from alignscope.apps.sweeps import SKIPPED, gpu_for_job, job_gpus
from conftest import save_tiny_local_model
from fake_slurm import install as install_fake_slurm

SMOKE = ["experiment=smoke", "trainer.max_steps=4", "logger=csv"]


def _cli(app: str, args: list[str], env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", f"alignscope.apps.{app}", "-m", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_SILENT": "true", "TRANSFORMERS_VERBOSITY": "warning", **env},
    )
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _stamps(sweep: Path) -> dict[str, int]:
    return {str(p.relative_to(sweep)): p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}


def _results(sweep: Path, name: str) -> dict[str, dict]:
    return {job: json.loads((sweep / job / name).read_text()) for job in ("0", "1")}


def _logs(sweep: Path, name: str) -> str:
    return "".join((sweep / job / name).read_text() for job in ("0", "1"))


@pytest.fixture(scope="module")
def probe_args(tmp_path_factory) -> list[str]:
    local = save_tiny_local_model(tmp_path_factory.mktemp("sweep-model") / "model", seed=3)
    return ["model=local", f"model.path={local}", "model.init=pretrained,random", "prompts.num=2"]


@pytest.mark.slow
def test_probe_sweep_submitit_local_equals_basic_and_reruns_skip(tmp_path, probe_args):
    local = tmp_path / "local"
    _cli("probe_app", [*probe_args, "probe.ks=[4]", "logger=csv", f"hydra.sweep.dir={local}",
                       "hydra/launcher=submitit_local"], {})  # fmt: skip
    assert (local / ".submitit").is_dir()
    assert sorted(r.init for r in find_runs([local])) == ["pretrained", "random"]  # what the report reads
    sweep = tmp_path / "sweep"
    args = [*probe_args, "probe.ks=[4]", "logger=csv", f"hydra.sweep.dir={sweep}"]
    _cli("probe_app", args, {})
    first, stamps = _results(sweep, "scalars.json"), _stamps(sweep)
    assert _results(local, "scalars.json") == first
    # the SLURM recipe of docs/apps.md, through submitit's sbatch script, srun and sacct (a stand-in SLURM)
    slurm = tmp_path / "slurm"
    env = install_fake_slurm(tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm-state")
    setup = f'hydra.launcher.setup=["touch {tmp_path}/setup-$SLURM_ARRAY_TASK_ID"]'
    _cli("probe_app", [*probe_args, "probe.ks=[4]", "logger=csv", f"hydra.sweep.dir={slurm}",
                       "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                       "hydra.launcher.array_parallelism=1", "hydra.launcher.timeout_min=5", setup], env)  # fmt: skip
    (script,) = (tmp_path / "fake-slurm-state").glob("job_*.sh")
    sbatch = script.read_text()
    for line in ("--array=0-1%1", "--partition=debug", "--time=5", "--gpus-per-node=1", "srun --unbuffered"):
        assert line in sbatch, sbatch
    assert (tmp_path / "setup-0").is_file() and (tmp_path / "setup-1").is_file()
    assert len(list((slurm / ".submitit").glob("*_0/*_0_log.out"))) == 1  # srun's output files
    assert _results(slurm, "scalars.json") == first
    assert sorted(r.init for r in find_runs([slurm])) == ["pretrained", "random"]
    assert all((sweep / job / "complete.json").is_file() for job in ("0", "1"))
    out = _cli("probe_app", args, {})
    assert _logs(sweep, "probe.log").count(SKIPPED) == 2 and (out.stdout + out.stderr).count(SKIPPED) == 2
    after = {k: v for k, v in _stamps(sweep).items() if not k.endswith(("probe.log", ".yaml", ".lock"))}
    assert after == {k: v for k, v in stamps.items() if not k.endswith(("probe.log", ".yaml", ".lock"))}
    assert _results(sweep, "scalars.json") == first
    # another setting in the same folders is refused as before, naming the difference
    out = _cli("probe_app", [*args[:-3], "probe.ks=[4,6]", *args[-2:]], {}, ok=False)
    assert "probe.ks: stored [4], now [4, 6]" in out.stdout + out.stderr
    # a finished job whose marker is gone (or of another config) is run again, reusing its stored prompts
    (sweep / "1" / "complete.json").unlink()
    _cli("probe_app", args, {})
    assert (sweep / "1" / "scalars.json").stat().st_mtime_ns > stamps["1/scalars.json"]
    assert (sweep / "0" / "scalars.json").stat().st_mtime_ns == stamps["0/scalars.json"]
    assert _results(sweep, "scalars.json") == first


@pytest.mark.slow
def test_training_sweep_submitit_local_equals_basic_and_reruns_skip(tmp_path, tmp_path_factory):
    env = {"ALIGNSCOPE_CACHE": str(tmp_path_factory.mktemp("sweep-cache"))}
    fake = tmp_path / "bin" / "nvidia-smi"  # a machine with 2 GPUs, as far as the launcher and jobs can tell
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: fake (UUID: GPU-0)'\necho 'GPU 1: fake (UUID: GPU-1)'\n")
    fake.chmod(0o755)
    runs = {}
    for launcher in ("basic", "submitit_local"):
        sweep = tmp_path / launcher
        path = {"PATH": f"{fake.parent}:{os.environ['PATH']}"} if launcher == "submitit_local" else {}
        args = [*SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep}", f"hydra/launcher={launcher}"]
        _cli("train", args, {**env, **path})
        runs[launcher] = _results(sweep, "summary.json")
        assert {m["global_step"] for m in _results(sweep, "metrics.json").values()} == {4}
    for job in ("0", "1"):  # submitit gave each job both GPUs (gpus_per_node: all); each kept one
        log = (tmp_path / "submitit_local" / job / "train.log").read_text()
        assert f"job {job}: CUDA_VISIBLE_DEVICES={job} (one GPU per job)" in log
        assert "CUDA_VISIBLE_DEVICES" not in (tmp_path / "basic" / job / "train.log").read_text()
    for job in ("0", "1"):
        basic, other = runs["basic"][job], runs["submitit_local"][job]
        assert other["coupling/k10"]["final"] == pytest.approx(basic["coupling/k10"]["final"], rel=1e-6)
    sweep = tmp_path / "basic"
    stamps = _stamps(sweep / "0" / "probes")
    _cli("train", [*SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep}"], env)
    assert _logs(sweep, "train.log").count(SKIPPED) == 2 and _stamps(sweep / "0" / "probes") == stamps
    # more steps: not complete, so trained again (a changed setting is recomputed as before)
    _cli("train", [*SMOKE, "seed=0", "trainer.max_steps=5", f"hydra.sweep.dir={sweep}"], env)
    assert json.loads((sweep / "0" / "metrics.json").read_text())["global_step"] == 5


@pytest.mark.parametrize(
    ("job", "env", "gpus", "expected"),
    [
        (0, {}, 4, "0"),
        (5, {}, 4, "1"),
        (3, {}, 1, None),  # one GPU: nothing to choose
        (3, {}, 0, None),
        (2, {"CUDA_VISIBLE_DEVICES": "1,2"}, 4, None),  # set by the user: left alone
        (3, {"SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 8, "0"),  # submitit's GPUs
        (1, {"SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": "4,6"}, 8, "6"),
        (1, {"SUBMITIT_EXECUTOR": "local", "CUDA_VISIBLE_DEVICES": ""}, 8, None),  # gpus_per_node=0
    ],
)
def test_one_gpu_per_job(job, env, gpus, expected):
    assert gpu_for_job(job, job_gpus(env, lambda: gpus)) == expected

"""W&B conventions, read back from offline run files: names and groups of a multirun not over seed, the
probe app's overrides, the logged config, history keys, images per probe, summary, artifacts, env vars."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from alignscope.apps.config import config_dir
from alignscope.apps.loggers import Job, run_group, run_name, wandb_settings
from conftest import wandb_probe_config
from test_train import SMOKE, cache_dir  # noqa: F401 (the session's data cache)
from wandb_records import read_run

FAST = [
    "trainer.max_steps=4",
    "probe.ks=[4]",
    "callbacks.alignment_monitor.every_n_steps=2",
    "callbacks.alignment_monitor.log_spaced=false",
]


def offline_run(run_dir: Path):
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    return read_run(folder)


def train_job(sweep: Path, cache_dir: str, num: int, overrides: list[str]):  # noqa: F811
    """Run job ``num`` of the sweep ``overrides`` (``key=a,b`` items) in this process, as Hydra's multirun
    would: the sweep's command line in ``multirun.yaml``, the job's own overrides in the Hydra config."""
    from alignscope.apps.train import train

    job = [o if "," not in o else f"{o.split('=')[0]}={o.split('=')[1].split(',')[num]}" for o in overrides]
    sweep.mkdir(parents=True, exist_ok=True)
    OmegaConf.save({"hydra": {"overrides": {"task": overrides}}}, sweep / "multirun.yaml")
    base = [*SMOKE, f"paths.run_dir={sweep / str(num)}", f"data.cache_dir={cache_dir}", "logger=wandb"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *base,
                *job,
                "hydra.mode=MULTIRUN",
                "hydra.job.name=train",
                f"hydra.job.num={num}",
                f"hydra.sweep.dir={sweep}",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        OmegaConf.set_struct(cfg, False)
        del cfg["hydra"]
        train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    return offline_run(sweep / str(num))


def test_multirun_not_over_seed_names_groups_history_summary(tmp_path, cache_dir):  # noqa: F811
    sweep = tmp_path / "multirun" / "train" / "sweep"
    runs = [train_job(sweep, cache_dir, num, ["model.config.n_layer=1,2", *FAST]) for num in (0, 1)]
    assert [r.name for r in runs] == [
        "tiny_gpt2-s0-0[model.config.n_layer=1]",
        "tiny_gpt2-s0-1[model.config.n_layer=2]",
    ]
    assert [r.group for r in runs] == [f"train-train-sweep[model.config.n_layer={n}]" for n in (1, 2)]
    for run in runs:
        assert run.job_type == "train" and run.tags == ["tiny_gpt2", "stdlib", "init-random"]
        assert run.exit_code == 0 and run.project == "alignscope"
        # the app's config once, with the run's real name and group; no second flattened hparams copy
        assert run.config["app"] == "alignscope-train" and run.config["init"] == "random"
        assert run.config["run_name"] == run.name and run.config["logger"]["wandb"]["group"] == run.group
        assert "lr" not in run.config and run.config["optim"]["lr"] > 0
        keys = run.history_keys()
        assert {"align/coupling/k4", "train/loss", "trainer/global_step"} <= keys
        assert not any(k.startswith("align/") and "/block_" in k for k in keys)
        assert "align_blocks.coupling.k4/block_00" in keys and "align_blocks.spectra.s1/block_00" in keys
        # this probe's figures at every probe's step, the comparison figures once at the end
        assert run.steps_of("align/figures/coupling_k4") == [0, 2, 4]
        assert run.steps_of("align/figures/trajectories_pca") == [0, 2, 4]
        assert run.steps_of("align/final_figures/metrics_vs_step") == [4]
        inits = [
            k.removesuffix("/init")
            for k in run.summary
            if k.startswith("align/summary/") and k.endswith("/init")
        ]
        assert "align/summary/lss/mean" in inits
        assert all(f"{k}/final" in run.summary and f"{k}/change" in run.summary for k in inits)
        assert run.summary["align/summary/final_step"] == 4
        assert [kind for _, kind in run.artifacts] == ["probes"]


def test_probe_app_honours_overrides(tmp_path):
    from alignscope.apps.probe_app import run

    overrides = ["run_name=mine", "group=my-group", "job_type=eval", "logger.wandb.tags=[a,b]"]
    cfg = wandb_probe_config(tmp_path, "model.init=random", "prompts.num=1", "probe.ks=[4]", *overrides)
    run(cfg)
    got = offline_run(tmp_path / "run")
    assert (got.name, got.group, got.job_type, got.tags) == ("mine", "my-group", "eval", ["a", "b"])
    assert got.config["app"] == "alignscope-probe" and got.config["job_type"] == "eval"
    assert got.config["logger"]["wandb"]["tags"] == ["a", "b"] and got.config["init"] == "random"
    assert got.steps_of("align/figures/coupling_k4") == [0] and "align/coupling/k4" in got.history_keys()
    assert [kind for _, kind in got.artifacts] == ["probe-result"]


def test_probe_app_default_tags_and_env_project_dir(tmp_path, monkeypatch):
    from alignscope.apps.probe_app import run

    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    cfg = wandb_probe_config(tmp_path, "model.init=pretrained", "prompts.num=1", "probe.ks=[4]")
    run(cfg)
    assert not (tmp_path / "run" / "wandb").exists()
    got = offline_run(tmp_path / "wandb-dir")
    assert (got.project, got.name, got.group, got.job_type) == (
        "from-env",
        "local-pretrained",
        "local-pretrained",
        "probe",
    )
    assert got.tags == ["local", "init-pretrained"]  # not the training app's tags


def test_names_and_groups_of_a_sweep():
    job = Job(
        num=3,
        sweep="train-d-t",
        overrides=("seed=1", "model.init=random", "x=1"),
        swept=("seed", "model.init"),
    )
    assert run_name("m-s1", job) == "m-s1-3[seed=1,model.init=random]"
    assert run_group("m-s1-3", job) == "train-d-t[model.init=random]"  # replicates over seed share a group
    assert run_group("m", Job(num=0, sweep="s", overrides=("seed=0",), swept=("seed",))) == "s"
    assert run_name("m", Job()) == "m" and run_group("m", Job()) == "m"
    swept_name = Job(num=1, sweep="s", overrides=("run_name=b",), swept=("run_name",))
    assert run_name("b", swept_name) == "b"


@pytest.mark.parametrize(
    ("overrides", "env", "project", "entity"),
    [
        ((), {}, "alignscope", None),
        ((), {"WANDB_PROJECT": "p-env", "WANDB_ENTITY": "e-env"}, "p-env", "e-env"),
        (("logger.wandb.project=p-cli",), {"WANDB_PROJECT": "p-env"}, "alignscope-cli", None),
    ],
)
def test_env_wins_over_config_and_cli_wins_over_env(overrides, env, project, entity):
    spec = {
        "project": "alignscope-cli" if overrides else "alignscope",
        "entity": None,
        "name": "n",
        "tags": None,
    }
    got = wandb_settings(spec, Job(overrides=overrides), "default", env=env)
    assert (got["project"], got["entity"], got["tags"]) == (project, entity, [])

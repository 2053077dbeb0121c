"""Bad settings and inputs of the apps: loggers and W&B modes, prompt files, score tables, model configs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alignscope.apps.config import config_dir
from alignscope.apps.loggers import LoggerConfigError
from alignscope.apps.runtime import ProbeSettingsError, probe_settings
from conftest import save_tiny_local_model
from test_train import compose_train, jsonl_steps


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("alignscope-cache"))


def compose_probe(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("probe_app", overrides=[f"paths.run_dir={run_dir}", *overrides])


FAST_FIT = ["trainer.max_steps=2", "data.corpus.max_files=8", "callbacks.alignment_monitor.figures=false"]


# ------------------------------------------------------------------------------------- loggers and W&B modes
@pytest.mark.parametrize(
    ("overrides", "wandb_mode"), [(["logger=none"], "offline"), (["logger=wandb"], "disabled")]
)
def test_training_without_a_logger(tmp_path, cache_dir, monkeypatch, caplog, overrides, wandb_mode):
    import wandb

    from alignscope.apps.train import train

    monkeypatch.setenv("WANDB_MODE", wandb_mode)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        final = train(compose_train(run, cache_dir, *overrides, *FAST_FIT))
    assert final["global_step"] == 2 and jsonl_steps(run) == [0, 1, 2]
    assert "leaving out LearningRateMonitor" in caplog.text
    assert not (run / "wandb").exists() and wandb.run is None


def _wandb_loggers(*overrides: str):
    from alignscope.apps.train import build_loggers

    return build_loggers(compose_train(Path("/nonexistent"), "/nonexistent", "logger=wandb", *overrides))


@pytest.mark.parametrize(
    ("env", "offline", "mode"),
    [
        (None, "true", "offline"),
        (None, "false", "online"),
        ("online", "true", "online"),  # an explicit WANDB_MODE wins over the config
        ("offline", "false", "offline"),
        ("dryrun", "false", "offline"),
        (" Online ", "true", "online"),
    ],
)
def test_wandb_mode_env_wins_over_config(monkeypatch, env, offline, mode):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    (logger,) = _wandb_loggers(f"logger.wandb.offline={offline}", "group=g")
    assert logger._wandb_init["mode"] == mode and logger._wandb_init["group"] == "g"
    assert not logger._offline  # the mode goes to wandb.init, not to Lightning's process-wide switch


def test_wandb_disabled_and_unknown_modes(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_loggers() == []
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(LoggerConfigError, match=r"WANDB_MODE='offlin' is not a W&B mode.*online, offline"):
        _wandb_loggers()


def test_logger_without_target_is_refused(monkeypatch):
    with pytest.raises(LoggerConfigError, match=r"logger.wandb needs a _target_.*logger=none"):
        _wandb_loggers("~logger.wandb._target_")


def test_probe_app_loggers_keep_their_naming_and_honour_disabled(tmp_path, monkeypatch):
    from alignscope.apps.probe_app import _loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_probe(tmp_path, "logger=wandb", "model=pythia_160m", "model.revision=step1000")
    (logger,) = _loggers(cfg)
    init = logger._wandb_init
    assert (init["group"], init["job_type"], init["name"]) == (
        "pythia_160m-pretrained-step1000",  # a group never mixes pretrained and random
        "probe",
        "pythia_160m-pretrained-step1000",
    )
    assert init["tags"] == ["pythia_160m", "init-pretrained"] and init["mode"] == "offline"
    assert "anonymous" not in init  # W&B warns about any value of its deprecated anonymous setting
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _loggers(cfg) == []
    assert _loggers(compose_probe(tmp_path, "logger=none")) == []


def test_offline_run_leaves_wandb_mode_of_the_process_alone(tmp_path, monkeypatch):
    from alignscope.apps.probe_app import run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    local = save_tiny_local_model(tmp_path / "model")
    run(
        compose_probe(tmp_path / "run", "logger=wandb", "model=local", f"model.path={local}", "prompts.num=1")
    )
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "WANDB_MODE" not in os.environ  # a later run configured online stays online


def test_wandb_disabled_probe_app_writes_no_run(tmp_path, monkeypatch):
    from alignscope.apps.probe_app import run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    local = save_tiny_local_model(tmp_path / "model")
    scalars = run(
        compose_probe(tmp_path / "run", "logger=wandb", "model=local", f"model.path={local}", "prompts.num=1")
    )
    assert scalars and (tmp_path / "run" / "scalars.json").is_file()
    assert not (tmp_path / "run" / "wandb").exists()


# ------------------------------------------------------------------------------------------ probe settings
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"chunk_size": -4}, "chunk_size must be a positive integer"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive integer"),
        ({"chunk_size": True}, "chunk_size must be a positive integer"),
        ({"ks": []}, "ks is empty"),
        ({"ks": [10, 0]}, r"ks must be a list of positive integers .* got \[10, 0\] \(0 is neither\)"),
        ({"ks": None}, "ks must be a list of positive integers"),
        ({"tokens": "first"}, "tokens must be 'last', 'all' or a list of positions"),
        ({"layers": []}, "layers is empty"),
        ({"engine": "fast"}, "unknown engine 'fast'"),
        ({"attention": "flash"}, "attention must be 'eager' or 'sdpa'"),
        ({"dtype": "float16"}, "dtype must be torch.float32 or torch.float64"),
    ],
)
def test_bad_probe_settings_are_refused(setting, message):
    with pytest.raises(ProbeSettingsError, match=rf"bad probe setting: {message}"):
        probe_settings({"_target_": "alignscope.ProbeSettings", **setting})


def test_good_probe_settings_pass():
    from alignscope import ProbeSettings

    assert probe_settings(
        {"_target_": "alignscope.ProbeSettings", "chunk_size": 8, "ks": 4}
    ) == ProbeSettings(chunk_size=8, ks=(4,))
    assert probe_settings({"_target_": "alignscope.ProbeSettings"}) == ProbeSettings()


def test_train_refuses_chunk_size_zero_before_any_work(tmp_path):
    from alignscope.apps.train import train

    cache = tmp_path / "cache"
    with pytest.raises(ProbeSettingsError, match=r"chunk_size must be a positive integer.*got 0"):
        train(compose_train(tmp_path / "run", str(cache), "logger=csv", "probe.chunk_size=0"))
    assert not cache.exists()  # no tokenizer trained, no data packed


# ------------------------------------------------------------------------------------------- prompt files
def test_prompt_file_not_utf8(tmp_path):
    from alignscope.apps.prompts import PromptConfigError, load_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("first prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptConfigError) as err:
        load_prompts("file", num=None, path=str(path))
    message = str(err.value)
    for part in (str(path), "not UTF-8", "byte 0xe9 at offset 16", "line 2", "Save the file as UTF-8"):
        assert part in message, part


def test_prompt_file_with_byte_order_mark(tmp_path):
    from alignscope.apps.prompts import load_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbffirst prompt\nsecond prompt\n")
    assert load_prompts("file", num=None, path=str(path)) == ["first prompt", "second prompt"]


# ------------------------------------------------------------------------------------------- report input
PAPER_SCORES = Path(__file__).resolve().parents[1] / "examples" / "paper_fig1a_scores.csv"


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    from alignscope.apps.probe_app import run

    root = tmp_path_factory.mktemp("report-input")
    local = save_tiny_local_model(root / "model")
    run(
        compose_probe(
            root / "runs" / "0",
            "logger=none",
            "model=local",
            f"model.path={local}",
            "model.init=pretrained",
            "prompts.num=1",
            "probe.ks=[4,10]",
        )
    )
    return root / "runs"


def _report_fails(argv: list[str], capsys) -> str:
    from alignscope.apps.report import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_report_names_a_missing_column(tmp_path, capsys):
    err = _report_fails(
        ["--scores", str(PAPER_SCORES), "--x-column", "coupling_in_papr", "--out", str(tmp_path / "r")],
        capsys,
    )
    assert "has no column 'coupling_in_papr'" in err and "did you mean 'coupling_in_paper'" in err
    assert "model, hub_id, coupling_in_paper, benchmark_score" in err
    assert not (tmp_path / "r").exists()
    err = _report_fails(
        ["--scores", str(PAPER_SCORES), "--x-column", "coupling_in_paper", "--score-column", "score"], capsys
    )
    assert "has no column 'score'" in err


def test_report_skips_and_lists_rows_with_blank_or_bad_cells(tmp_path):
    from alignscope.apps.report import build_report

    scores = tmp_path / "scores.csv"
    scores.write_text(
        "model,x,benchmark_score\na,0.1,1.0\nb,,2.0\nc,0.3,n/a\nd,0.4,4.0\ne,0.5,nan\nf,0.6,6.0\n"
    )
    written = build_report([], tmp_path / "r", scores=str(scores), x_column="x")
    (reg,) = written["regressions"]
    assert reg.n == 3 and reg.slope == pytest.approx(10.0)  # a, d, f: y = 10 x
    assert written["skipped"] == [
        "line 3 (b): x is blank",
        "line 4 (c): benchmark_score='n/a' is not a finite number",
        "line 6 (e): benchmark_score='nan' is not a finite number",
    ]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Skipped rows" in md and "line 4 (c)" in md


def test_report_fails_when_no_row_is_usable(tmp_path, capsys):
    scores = tmp_path / "scores.csv"
    scores.write_text("model,x,benchmark_score\na,,1.0\nb,x,2.0\n")
    err = _report_fails(["--scores", str(scores), "--x-column", "x", "--out", str(tmp_path / "r")], capsys)
    assert "no usable row" in err and "line 2 (a): x is blank" in err and "line 3 (b)" in err


def test_report_lists_unmatched_models(pretrained_run, tmp_path):
    from alignscope.apps.report import build_report

    scores = tmp_path / "scores.csv"
    scores.write_text("model,hub_id,benchmark_score\nlocal,,50.0\ngpt9,org/gpt9,40.0\n")
    written = build_report([pretrained_run], tmp_path / "r", k=4, scores=str(scores))
    assert written["unmatched"] == ["gpt9 (line 3)"]
    assert {r.x_name: r.n for r in written["regressions"]}["coupling/k10"] == 1
    assert "- gpt9 (line 3)" in (tmp_path / "r" / "report.md").read_text()


def test_report_fails_when_no_model_matches(pretrained_run, tmp_path, capsys):
    scores = tmp_path / "scores.csv"
    scores.write_text("model,hub_id,benchmark_score\ngpt9,org/gpt9,40.0\n")
    err = _report_fails([str(pretrained_run), "--k", "4", "--scores", str(scores)], capsys)
    assert "no row of" in err and "matches a pretrained probe run" in err
    assert "['local']" in err and "['gpt9']" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "7"], r"--k 7 is not among the probed K of 1 run\(s\).*choose one of \[4, 10\]"),
        (["--k", "4", "--metric", "coupling/k1O"], r"--metric 'coupling/k1O'.*did you mean 'coupling/k10'"),
        (
            ["--k", "4", "--score-column", "benchmark"],
            r"no column 'benchmark'.*did you mean 'benchmark_score'",
        ),
    ],
)
def test_report_checks_k_metric_and_columns_first(pretrained_run, tmp_path, capsys, args, message):
    import re

    scores = tmp_path / "scores.csv"
    scores.write_text("model,benchmark_score\nlocal,50.0\n")
    err = _report_fails(
        [str(pretrained_run), "--out", str(tmp_path / "r"), "--scores", str(scores), *args], capsys
    )
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------- model configs
@pytest.mark.parametrize(
    ("model", "typo", "suggestion"),
    [
        ("tiny_gpt2", "n_layr", "n_layer"),
        ("tiny_llama", "num_hiden_layers", "num_hidden_layers"),
        ("tiny_llama", "rms_norm_epsilon", "rms_norm_eps"),
    ],
)
def test_unknown_model_config_key_is_refused(tmp_path, model, typo, suggestion):
    from hydra.utils import instantiate

    from alignscope.models import ModelConfigError

    cfg = compose_train(tmp_path, str(tmp_path), f"model={model}", f"+model.config.{typo}=3")
    with pytest.raises(ModelConfigError, match=rf"does not know.*{typo} \(did you mean {suggestion}"):
        instantiate(cfg.model)(vocab_size=64)


def test_hf_config_name_refuses_unknown_keys(tmp_path):
    from transformers import GPT2Config

    from alignscope.models import ModelConfigError, load_model

    GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32).save_pretrained(tmp_path)
    built = {"source": "config", "init": "random", "config_name": str(tmp_path), "vocab_size": 64}
    with pytest.raises(ModelConfigError, match=r"GPT2Config does not know.*n_embed \(did you mean n_embd"):
        load_model(**built, config={"n_embed": 32})
    with pytest.raises(ModelConfigError, match=r"rope_theta \(no close match\)"):
        load_model(**built, config={"rope_theta": 10.0})


def test_known_and_consumed_model_config_keys_pass():
    from alignscope.models import load_model

    built = {"source": "config", "init": "random", "vocab_size": 64}
    gpt2 = load_model(
        **built, model_type="gpt2", config={"n_layer": 1, "n_embd": 16, "n_head": 2, "hidden_size": 16}
    )
    assert gpt2.config.n_embd == 16  # hidden_size is GPT-2's alias (attribute_map) of n_embd
    config = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    llama = load_model(
        **built, model_type="llama", config={**config, "rope_theta": 500.0, "attn_implementation": "eager"}
    )
    assert llama.config.rope_parameters["rope_theta"] == 500.0  # consumed by LlamaConfig, not ignored

"""Run folders: fingerprints refuse results of other settings, one writer at a time, torn lines, atomic files,
and the apps' use of them (alignscope-probe and the AlignmentMonitor)."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch

from alignscope.apps.run_folder import (
    FINGERPRINT,
    RunFolder,
    RunFolderError,
    append_record,
    differences,
    read_records,
    weights_digest,
    write_json,
)
from conftest import save_tiny_local_model, tiny_model
from test_probe_app import compose_probe

RESULTS = ("probes.jsonl", "probes")


# ----------------------------------------------------------------------------------------------- the module
def test_differences_name_each_changed_key():
    stored = {"model": {"name": "a", "init": "random"}, "probe": {"ks": [10, 30]}, "prompts": ["x", "y"]}
    now = {"model": {"name": "a", "init": "pretrained"}, "probe": {"ks": [10]}, "prompts": ["x", "z", "w"]}
    diff = differences(stored, now)
    assert 'model.init: stored "random", now "pretrained"' in diff
    assert "probe.ks: stored [10, 30], now [10]" in diff
    assert "prompts (count): stored 2, now 3" in diff
    assert 'prompts[1]: stored "y", now "z"' in diff
    assert not any(d.startswith("model.name") for d in diff)
    assert differences(stored, stored) == []


def test_weights_digest_sees_every_parameter_and_dtype():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-6
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) != weights_digest(tiny_model("llama", seed=0).to(torch.float64))


def test_folder_refuses_other_settings_and_overwrite_clears_only_results(tmp_path):
    with RunFolder(tmp_path, RESULTS) as folder:
        folder.claim({"model": "a", "ks": [10]})
        append_record(tmp_path / "probes.jsonl", {"step": 0})
    (tmp_path / "csv").mkdir()  # a logger's folder: not the app's results
    with RunFolder(tmp_path, RESULTS) as folder:
        folder.claim({"model": "a", "ks": [10]})  # same settings: accepted
        with pytest.raises(RunFolderError, match=r"model: stored \"a\", now \"b\"") as err:
            folder.claim({"model": "b", "ks": [10]})
        assert "overwrite=true" in str(err.value) and "new folder" in str(err.value)
        assert (tmp_path / "probes.jsonl").is_file()
        folder.claim({"model": "b", "ks": [10]}, overwrite=True)
    assert not (tmp_path / "probes.jsonl").exists() and (tmp_path / "csv").is_dir()
    assert json.loads((tmp_path / FINGERPRINT).read_text()) == {"model": "b", "ks": [10]}


def test_folder_with_results_but_no_fingerprint_is_refused(tmp_path):
    append_record(tmp_path / "probes.jsonl", {"step": 0})
    with RunFolder(tmp_path, RESULTS) as folder, pytest.raises(RunFolderError, match="no fingerprint"):
        folder.claim({"model": "a"})


def _hold_lock(path: str, ready, release) -> None:
    with RunFolder(path, RESULTS):
        ready.set()
        release.wait(30)


def test_second_writer_fails_fast_and_a_dead_holder_frees_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunFolderError, match="another process is writing"), RunFolder(tmp_path, RESULTS):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.join()
    with RunFolder(tmp_path, RESULTS):  # the operating system released the lock
        pass


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "probes.jsonl"
    append_record(path, {"prompt": 0, "x": 1.0})
    with open(path, "a") as fh:
        fh.write('{"prompt": 1, "x": 0.5')  # a writer killed mid-line
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_records(path) == [{"prompt": 0, "x": 1.0}]
    append_record(path, {"prompt": 1, "x": 2.0})
    assert read_records(path) == [{"prompt": 0, "x": 1.0}, {"prompt": 1, "x": 2.0}]
    path.write_text('{"prompt": 0}\nnot json\n{"prompt": 2}\n')
    with pytest.raises(RunFolderError, match="line 2"):
        read_records(path)


def test_atomic_writes_leave_no_temp_files_and_stale_temps_are_removed(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    (tmp_path / "probes").mkdir()
    stale = [tmp_path / ".summary.json.123-abc.tmp", tmp_path / "probes" / ".step_0000003.tmp-9-ab"]
    stale[0].write_text("{")
    stale[1].mkdir()
    with RunFolder(tmp_path, RESULTS):
        assert not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------------------------- probe app
@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clean = save_tiny_local_model(root / "clean", seed=3)
    from transformers import AutoModelForCausalLM

    broken = AutoModelForCausalLM.from_pretrained(clean)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    broken.save_pretrained(root / "nan")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(clean) / name).is_file():
            (root / "nan" / name).write_bytes((Path(clean) / name).read_bytes())
    return Path(clean), root / "nan"


def probe_run(run_dir: Path, model: Path, *overrides: str):
    from alignscope.apps.probe_app import run

    return run(
        compose_probe(
            run_dir, "model=local", f"model.path={model}", "prompts.num=2", "probe.ks=[4]", *overrides
        )
    )


def test_probe_app_refuses_a_folder_of_another_model(local_models, tmp_path, capsys):
    clean, nan = local_models
    run_dir = tmp_path / "run"
    scalars = probe_run(run_dir, clean)
    lines = (run_dir / "probes.jsonl").read_text()
    with pytest.raises(RunFolderError) as err:
        probe_run(run_dir, nan)
    message = str(err.value)
    assert "model.path" in message and "overwrite=true" in message
    assert (run_dir / "probes.jsonl").read_text() == lines  # nothing touched
    with pytest.raises(RunFolderError, match=r"probe\.ks"):
        probe_run(run_dir, clean, "probe.ks=[4,8]")
    with pytest.raises(RunFolderError, match=r"prompts\.texts"):
        probe_run(run_dir, clean, "prompts.num=3")
    assert json.loads((run_dir / "scalars.json").read_text()) == pytest.approx(scalars, nan_ok=True)
    # the same model folder with other weights (retrained in place): the weights' hash tells
    import shutil

    in_place = Path(shutil.copytree(clean, tmp_path / "model"))
    probe_run(tmp_path / "run2", in_place)
    shutil.copy(nan / "model.safetensors", in_place / "model.safetensors")
    with pytest.raises(RunFolderError, match=r"weights\.sha256"):
        probe_run(tmp_path / "run2", in_place)


def test_probe_app_refuses_a_stored_prompt_of_other_ids(local_models, tmp_path):
    clean, _ = local_models
    run_dir = tmp_path / "run"
    probe_run(run_dir, clean)
    path = run_dir / "probes.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[1]["ids_sha256"] = "0" * 64  # the folder edited by hand
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(RunFolderError, match="prompt 1 with other text or token ids"):
        probe_run(run_dir, clean)


def test_probe_app_on_non_finite_model_writes_everything_and_says_so(local_models, tmp_path, caplog):
    clean, nan = local_models
    run_dir = tmp_path / "run"
    probe_run(run_dir, clean)
    caplog.clear()
    scalars = probe_run(run_dir, nan, "overwrite=true")
    assert math.isnan(scalars["coupling/k4"])
    for name in ("scalars.json", "run.json", "result/tensors.safetensors", "figures/coupling_k4.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "figures" / "trajectories_pca.png").is_file()
    lines = [json.loads(x) for x in (run_dir / "probes.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [0, 1] and all(math.isnan(x["coupling/k4"]) for x in lines)
    warned = [r for r in caplog.records if r.name == "alignscope.apps.problems" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "non-finite from x^2 (block 1's output)" in warned[0].getMessage()


def test_probe_app_lock_refuses_a_second_writer(local_models, tmp_path):
    clean, _ = local_models
    with (
        RunFolder(tmp_path / "run", ("probes.jsonl",)),
        pytest.raises(RunFolderError, match="another process"),
    ):
        probe_run(tmp_path / "run", clean)


def test_probe_app_torn_last_line_is_recomputed(local_models, tmp_path):
    clean, _ = local_models
    run_dir = tmp_path / "run"
    first = probe_run(run_dir, clean)
    path = run_dir / "probes.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:40])
    with pytest.warns(UserWarning, match="partial last line"):
        again = probe_run(run_dir, clean)
    assert [json.loads(x)["prompt"] for x in path.read_text().splitlines()] == [0, 1]
    assert again == pytest.approx(first)


def test_probe_app_checks_probe_settings_before_touching_the_folder(local_models, tmp_path):
    from alignscope.apps.runtime import ProbeSettingsError

    clean, _ = local_models
    with pytest.raises(ProbeSettingsError, match="chunk_size"):
        probe_run(tmp_path / "run", clean, "probe.chunk_size=0")
    assert not (tmp_path / "run" / FINGERPRINT).exists()


def test_probe_app_report_blocks_follow_probed_layers(local_models, tmp_path):
    clean, _ = local_models
    probe_run(tmp_path / "run", clean, "probe.layers=[0,2]")
    meta = json.loads((tmp_path / "run" / "result" / "meta.json").read_text())
    assert meta["kept_blocks"] == [0, 2]
    with pytest.raises(ValueError, match="report_blocks"):
        probe_run(tmp_path / "run2", clean, "probe.layers=[0,2]", "report_blocks=[1]")


def test_probe_app_truncates_to_the_models_context(tmp_path):
    short = save_tiny_local_model(tmp_path / "short", seed=1)
    config = json.loads((Path(short) / "config.json").read_text())
    config["max_position_embeddings"] = 6
    (Path(short) / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="more than the model's context of 6"):
        probe_run(tmp_path / "run", short)
    meta = json.loads((tmp_path / "run" / "result" / "meta.json").read_text())
    assert max(meta["prompt_lengths"]) == 6


# ----------------------------------------------------------------------------------------------- the monitor
def _fit(dirpath: Path, layers: int = 3, lr: float = 0.5, **monitor_kwargs):
    from alignscope.apps.callback import AlignmentMonitor
    from test_callback import PlainLM, loaders, quiet_trainer

    module = PlainLM()
    if layers != 3:
        module.net = tiny_model("llama", num_hidden_layers=layers).train()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=lr)
    monitor = AlignmentMonitor(
        every_n_steps=2,
        log_spaced=False,
        num_prompts=2,
        prompt_length=8,
        dirpath=str(dirpath),
        **monitor_kwargs,
    )
    quiet_trainer(max_steps=2, callbacks=[monitor]).fit(module, *loaders())
    return monitor


def test_monitor_refuses_probes_of_another_model(tmp_path):
    _fit(tmp_path)
    before = (tmp_path / "probes.jsonl").read_text()
    with pytest.raises(RunFolderError, match=r"model\.config\.num_hidden_layers: stored 3, now 2"):
        _fit(tmp_path, layers=2)
    assert (tmp_path / "probes.jsonl").read_text() == before
    monitor = _fit(tmp_path, layers=2, overwrite=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert steps == monitor.probed_steps == [0, 2]
    assert json.loads((tmp_path / FINGERPRINT).read_text())["model"]["config"]["num_hidden_layers"] == 2


def test_monitor_on_a_diverged_run_writes_summary_and_figures(tmp_path, caplog):
    with pytest.warns(UserWarning):
        _fit(tmp_path, lr=1e12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isnan(summary["coupling/k10"]["final"])
    assert (tmp_path / "figures" / "metrics_vs_step.png").is_file()
    assert (tmp_path / "figures" / "trajectories_pca.png").is_file()
    assert any(r.name == "alignscope.apps.problems" and r.levelname == "WARNING" for r in caplog.records)

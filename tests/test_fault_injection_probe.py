"""alignscope-probe killed (SIGKILL) at several points and rerun, and two processes started in one folder:
nothing computed is lost, nothing is duplicated, the rerun completes, and the numbers equal an uninterrupted
run's. Each run is a real subprocess of ``python -m alignscope.apps.probe_app`` on a tiny local model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import save_tiny_local_model

PROMPTS = 4


def command(run_dir: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alignscope.apps.probe_app",
        f"hydra.run.dir={run_dir}",
        "model=local",
        f"model.path={model}",
        f"prompts.num={PROMPTS}",
        "probe.ks=[4]",
        "logger=none",
        *extra,
    ]


def start(run_dir: Path, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as fh:
        return subprocess.Popen(command(run_dir, model, *extra), stdout=fh, stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    assert proc.wait(timeout) == 0, log.read_text()[-3000:]


def kill_when(proc: subprocess.Popen, ready: Callable[[float], bool], timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``ready(seconds since start)``; False if it exited first."""
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() < started + timeout:
        if ready(time.monotonic() - started):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "probes.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return Path(save_tiny_local_model(tmp_path_factory.mktemp("model") / "m", seed=2))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(start(run_dir, model, run_dir.parent / "log"), run_dir.parent / "log")
    return run_dir


KILL_POINTS: dict[str, Callable[[Path, float], bool]] = {
    "while starting": lambda run, seconds: seconds > 1.5,
    "after the first prompt": lambda run, seconds: len(records(run)) >= 1,
    "while joining the prompts": lambda run, seconds: len(records(run)) == PROMPTS,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_probe_app_resumes_to_the_same_numbers(point, model, reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    killed = kill_when(start(run_dir, model, log), lambda seconds: KILL_POINTS[point](run_dir, seconds))
    assert killed, f"the run finished before the kill point {point!r}"
    before = records(run_dir)
    stamps = {
        r["prompt"]: (run_dir / "prompts" / f"p{r['prompt']:03d}" / "tensors.safetensors").stat().st_mtime_ns
        for r in before
    }
    finish(start(run_dir, model, log), log)
    after = records(run_dir)
    assert [r["prompt"] for r in after] == list(range(PROMPTS))  # each prompt once, in order
    for r in before:  # what was computed before the kill was kept, not recomputed
        path = run_dir / "prompts" / f"p{r['prompt']:03d}" / "tensors.safetensors"
        assert path.stat().st_mtime_ns == stamps[r["prompt"]]
    want = json.loads((reference / "scalars.json").read_text())
    got = json.loads((run_dir / "scalars.json").read_text())
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    leftovers = [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not leftovers


def test_second_process_in_the_same_folder_fails_fast(model, reference, tmp_path):
    run_dir = tmp_path / "run"
    slow = (
        "probe.tokens=all",
    )  # every token of every prompt: the first run is still busy when the second starts
    first = start(run_dir, model, tmp_path / "log1", *slow)
    deadline = time.monotonic() + 240
    while not (run_dir / "fingerprint.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start(run_dir, model, tmp_path / "log2", *slow)
    assert second.wait(120) != 0
    assert first.poll() is None, "the first run ended before the second one started: make it slower"
    assert "another process is writing to the run folder" in (tmp_path / "log2").read_text()
    first.kill()  # no need to wait for it: the second one never wrote
    first.wait()
    done = [r["prompt"] for r in records(run_dir)]
    assert done == list(range(len(done)))  # one writer: each prompt once, in order

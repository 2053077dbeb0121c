"""The README's main job on its offline default: the demo app runs, prints metrics and saves its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alignscope import ProbeResult


def test_demo_app_prints_and_saves(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignscope.apps.demo",
            f"hydra.run.dir={run_dir}",
            "prompts.num=2",
            "model=tiny_llama",
            "probe.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"},
    )
    assert out.returncode == 0, out.stderr
    assert "[transformers]" not in out.stderr, out.stderr  # no warning our settings cause
    assert "LlamaForCausalLM at random init (seed 0): 4 blocks, d=128" in out.stdout
    log = (run_dir / "demo.log").read_text()  # the job's log file has the table too
    assert "LlamaForCausalLM at random init" in log and "linearization/cosine" in log
    assert "coupling/k10" in out.stdout and "linearization/cosine" in out.stdout
    saved = ProbeResult.load(run_dir / "probe")
    assert saved.hidden_states.shape == (2, 5, 128)
    assert (
        json.loads((run_dir / "probe" / "scalars.json").read_text())["coupling/k10"]
        == saved.scalars()["coupling/k10"]
    )


def test_demo_rejects_a_bad_override(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "alignscope.apps.demo", f"hydra.run.dir={tmp_path}", "probe.layers=[99]"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "out of range" in out.stderr + out.stdout

"""Fault injection for ``alignscope-train``: SIGKILL at several points, resume from ``checkpoints/last.ckpt``.

A resumed run must reproduce an uninterrupted one: the same training order (the sampler's position is in the
checkpoint), the same random draws (dropout is on here; the generators' states are in the checkpoint), so the
same per-step losses and every probe scalar, each probed step exactly once and in order.

The runs: 8 batches per epoch (``limit_train_batches``), 16 steps, so epochs end at steps 8 and 16; a
checkpoint every 4 steps (8 and 16 at an epoch's end, 4 and 12 mid-epoch); probes every 5 steps and at the end.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MAX_STEPS = 16
BATCHES_PER_EPOCH = 8
BATCH_SIZE = 16
PROBED = [0, 5, 10, 15, 16]
SETTINGS = [
    "experiment=smoke",
    "data.corpus.max_files=6",  # enough text for every epoch whatever files the seeded sample picks
    f"data.batch_size={BATCH_SIZE}",
    f"+trainer.limit_train_batches={BATCHES_PER_EPOCH}",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.log_every_n_steps=1",
    "model.config.resid_pdrop=0.1",
    "model.config.attn_pdrop=0.1",
    "logger=csv",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.alignment_monitor.every_n_steps=5",
    "callbacks.alignment_monitor.log_spaced=false",
    "callbacks.alignment_monitor.figures=false",
    "callbacks.progress_bar=null",
]


def inject(at: str | None = None, step: int = 0, sleep_s: float = 0.0) -> list[str]:
    """Overrides that add :class:`fault_injector.FaultInjector` to the run's callbacks."""
    out = ["+callbacks.fault._target_=fault_injector.FaultInjector", f"+callbacks.fault.step={step}"]
    if at is not None:
        out.append(f"+callbacks.fault.at={at}")
    if sleep_s:
        out.append(f"+callbacks.fault.sleep_s={sleep_s}")
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """A data cache for this module, built once (tokenizer and packed arrays)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from alignscope.apps.config import config_dir

    folder = tmp_path_factory.mktemp("alignscope-cache")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*SETTINGS, f"paths.run_dir={folder / 'unused'}"])
    instantiate(cfg.data, cache_dir=str(folder)).prepare()
    return str(folder)


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "alignscope.apps.train", *SETTINGS, f"paths.run_dir={run_dir}", *overrides]


def environment(cache_dir: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "ALIGNSCOPE_CACHE": cache_dir, "PYTHONPATH": path, "WANDB_SILENT": "true"}


def train(run_dir: Path, cache_dir: str, *overrides: str, killed: bool = False) -> str:
    """Run ``alignscope-train``; it must finish (or, with ``killed``, die of SIGKILL). Returns its stderr."""
    out = subprocess.run(
        command(run_dir, *overrides), capture_output=True, text=True, timeout=300, env=environment(cache_dir)
    )
    expected = -signal.SIGKILL if killed else 0
    assert out.returncode == expected, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stderr


def resume(run_dir: Path, cache_dir: str, *overrides: str, ckpt_dir: Path | None = None) -> None:
    """Resume from ``<ckpt_dir or run_dir>/checkpoints/last.ckpt``; Lightning finds the loader resumable."""
    ckpt = (ckpt_dir or run_dir) / "checkpoints" / "last.ckpt"
    stderr = train(run_dir, cache_dir, f"ckpt_path={ckpt}", *overrides)
    assert "not resumable" not in stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(run, cache_dir)
    return run


def probes(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]


def logged(run_dir: Path, name: str) -> dict[int, float]:
    """``{step: value}`` of a per-step metric in the CSV log (a step logged twice must agree with itself)."""
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):  # one version per attempt
        with open(path) as fh:
            rows += [r for r in csv.DictReader(fh) if r.get(name)]
    values: dict[int, float] = {}
    for r in rows:
        step, value = int(r["step"]), float(r[name])
        assert values.setdefault(step, value) == value, f"{name} logged twice at step {step}, differently"
    return values


def checkpoint(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def checkpoint_step(run_dir: Path) -> int:
    return int(checkpoint(run_dir)["global_step"])


def assert_same_probes(run_dir: Path, reference: Path) -> None:
    got, want = probes(run_dir), probes(reference)
    assert [p["step"] for p in got] == [p["step"] for p in want] == PROBED  # each once, in order
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(g[key]), (g["step"], key)
            else:
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (g["step"], key)


def assert_same_training(
    run_dir: Path, reference: Path, resumed_from: int, earlier: Path | None = None
) -> None:
    """Every step the killed and the resumed attempt logged (in ``run_dir``, and in ``earlier`` when the resume
    went to a new folder) has the reference's loss and learning rate, and together they logged every step:
    nothing before the kill was lost."""
    for name in ("train/loss", "train/lr"):
        got, want = logged(run_dir, name), logged(reference, name)
        if earlier is not None:
            got = {**logged(earlier, name), **got}
        assert set(range(1, MAX_STEPS)) <= set(got), (name, resumed_from, sorted(got))
        for step, value in got.items():
            assert value == pytest.approx(want[step], rel=1e-5), (name, step)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.05)


# ------------------------------------------------------------------ in process: the pieces a resume relies on
def test_sampler_resumes_mid_epoch_from_its_state():
    from alignscope.apps.resumable import ResumableSampler

    data = list(range(23))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(1)
    epoch_0 = list(ResumableSampler(data, seed=3))
    it = iter(sampler)
    first = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert state["epoch"] == 1 and state["position"] == 7
    resumed = ResumableSampler(data, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(resumed) == 23  # the whole epoch, also mid-epoch: the trainer counts batches by it
    assert sorted(first + rest) == data and first + rest != epoch_0  # epoch 1's permutation, not epoch 0's
    fresh = ResumableSampler(data, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == first + rest
    resumed.set_epoch(2)  # a new epoch starts at its beginning
    assert len(list(resumed)) == 23
    assert list(resumed) == list(resumed)  # a finished epoch iterated again starts over, same order


def test_sampler_shards_ranks_and_refuses_a_state_of_other_data():
    from alignscope.apps.resumable import ResumableSampler, SamplerStateError

    data = list(range(21))
    ranks = [list(ResumableSampler(data, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10 and not set(ranks[0]) & set(ranks[1])
    state = ResumableSampler(list(range(20)), seed=0).state_dict()
    with pytest.raises(SamplerStateError, match="dataset_size 20 in the checkpoint, 21 now.*data settings"):
        ResumableSampler(data, seed=0).load_state_dict(state)


def test_loader_state_counts_the_batches_handed_out_not_those_workers_read_ahead():
    import torch
    from torch.utils.data import TensorDataset

    from alignscope.apps.resumable import ResumableDataLoader, ResumableSampler

    data = TensorDataset(torch.arange(64))

    def loader(epoch: int = 0) -> ResumableDataLoader:
        sampler = ResumableSampler(data, seed=1)
        sampler.set_epoch(epoch)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler, num_workers=2, drop_last=True)

    first = loader()
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    assert state["position"] == 12 < first.sampler.position  # the workers have read further
    following = next(batches)[0]
    again = loader()
    again.load_state_dict(state)
    assert next(iter(again))[0].equal(following)
    # resumed at an epoch's end: Lightning creates the iterator, then sets the next epoch
    at_end = loader()
    at_end.load_state_dict({**state, "position": 64})
    batches = iter(at_end)
    at_end.sampler.set_epoch(1)
    assert next(batches)[0].equal(next(iter(loader(epoch=1)))[0])


def test_train_loader_state_continues_the_training_order(cache_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from alignscope.apps.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*SETTINGS, f"paths.run_dir={tmp_path}"])

    def datamodule():
        dm = instantiate(cfg.data, cache_dir=cache_dir)
        dm.setup("fit")
        return dm

    loader = datamodule().train_dataloader()
    batches = iter(loader)
    seen = [next(batches)[0] for _ in range(3)]
    state = loader.state_dict()  # what Lightning puts in the checkpoint (the fit loop's state)
    assert state["epoch"] == 0 and state["position"] == 3 * loader.batch_size
    later = next(batches)[0]
    again = datamodule().train_dataloader()
    again.load_state_dict(state)  # Lightning: before it iterates the loader again
    assert len(again) == len(loader)
    assert next(iter(again))[0].equal(later)
    assert not any(later.equal(b) for b in seen)


def test_checkpoint_carries_the_random_streams():
    import io
    import random

    import numpy as np
    import torch

    from alignscope.apps.lm import CausalLMModule
    from alignscope.models.tiny import tiny_model

    module = CausalLMModule(tiny_model("gpt2"))
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(4), np.random.rand(2), random.random())
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)  # plain values and tensors only
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    resumed = CausalLMModule(tiny_model("gpt2"))
    resumed.on_load_checkpoint(restored)
    torch.rand(3)  # what building loaders and callbacks may draw before training starts
    resumed.on_train_start()
    got = (torch.rand(4), np.random.rand(2), random.random())
    assert got[0].equal(expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# ------------------------------------------------------------------ subprocesses: kill -9 and resume
def test_uninterrupted_run_reference(reference):
    assert [p["step"] for p in probes(reference)] == PROBED
    assert set(logged(reference, "train/loss")) >= set(range(1, MAX_STEPS))
    assert checkpoint_step(reference) == MAX_STEPS


def test_sigkill_after_a_checkpoint_then_resume_reproduces_the_uninterrupted_run(
    tmp_path, cache_dir, reference
):
    """Killed from outside once a checkpoint is on disk and two probes are in probes.jsonl; resumed in the same
    folder."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    jsonl = run / "probes.jsonl"
    with subprocess.Popen(
        command(run, *inject(sleep_s=0.3)),
        env=environment(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        wait_for(
            lambda: ckpt.is_file() and jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 2, proc
        )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    before = checkpoint_step(run)
    assert 0 < before < MAX_STEPS
    resume(run, cache_dir)
    assert_same_probes(run, reference)
    assert_same_training(run, reference, resumed_from=before)


@pytest.mark.parametrize(
    ("at", "step", "resumed_from", "extra"),
    [
        ("probe_saved", 0, None, []),  # during the first probe: no checkpoint yet, the rerun starts over
        ("batch_end", 10, 8, []),  # between checkpoints, after a probe the last checkpoint (epoch end) lacks
        ("batch_start", 12, 12, []),  # right after a mid-epoch checkpoint
        ("checkpoint_dump", 12, 8, []),  # while the checkpoint of step 12 is assembled: the one of 8 stays
        ("batch_start", 12, 12, ["data.num_workers=2"]),  # workers read ahead of training
    ],
    ids=[
        "first_probe",
        "between_checkpoints",
        "after_checkpoint",
        "during_checkpoint",
        "after_checkpoint_workers",
    ],
)
def test_kill_points(tmp_path, cache_dir, reference, at, step, resumed_from, extra):
    run = tmp_path / "run"
    train(run, cache_dir, *inject(at, step), *extra, killed=True)
    computed = [p["step"] for p in probes(run)]
    if resumed_from is None:
        assert not (run / "checkpoints" / "last.ckpt").exists()
        train(run, cache_dir, *extra)  # the same command again, in the same folder
    else:
        saved = checkpoint(run)
        assert saved["global_step"] == resumed_from
        # Lightning keeps the training loader's state in the fit loop's: the epoch and the samples it handed out
        (loader,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        epoch = (resumed_from - 1) // BATCHES_PER_EPOCH
        assert loader["epoch"] == epoch
        assert loader["position"] == (resumed_from - epoch * BATCHES_PER_EPOCH) * BATCH_SIZE
        resume(run, cache_dir, *extra)
    final = [p["step"] for p in probes(run)]
    assert set(computed) <= set(final)  # nothing computed before the kill is lost ...
    assert_same_probes(run, reference)  # ... nor duplicated; the values are the uninterrupted run's
    for p in PROBED:
        assert (run / "probes" / f"step_{p:07d}" / "tensors.safetensors").is_file()
    assert not list(run.glob("**/.*.tmp*"))  # no temp files of the killed writer are left
    assert_same_training(run, reference, resumed_from=resumed_from or 0)


def test_resume_into_a_new_folder_brings_the_earlier_probes_along(tmp_path, cache_dir, reference):
    """``alignscope-train ckpt_path=<old run>/checkpoints/last.ckpt`` with a new run folder."""
    old, new = tmp_path / "old", tmp_path / "new"
    train(old, cache_dir, *inject("batch_end", 10), killed=True)
    assert checkpoint_step(old) == 8
    resume(new, cache_dir, ckpt_dir=old)
    assert_same_probes(new, reference)  # steps 0 and 5 come from the checkpoint, the rest from the new run
    for p in PROBED:  # the tensors too, so figures comparing init with the end can be drawn
        assert (new / "probes" / f"step_{p:07d}" / "tensors.safetensors").is_file()
    assert_same_training(new, reference, resumed_from=8, earlier=old)

"""Shared helpers: tiny models and an independent whole-model Jacobian by torch.autograd.functional."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["WANDB_MODE"] = (
    "offline"  # WANDB_MODE wins over the configs: a user's "online" must not reach the tests
)

from alignscope.models.reference import reference_jacobian

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # one share of the cores per test process: OpenMP threads
    # of two processes competing for two cores spin-wait and slow tiny-model tests down ~50x
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
from alignscope.models.tiny import TINY_CONFIGS, VISION_FAMILIES, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
TEXT_FAMILIES = [f for f in FAMILIES if f not in VISION_FAMILIES]
"""The families that take token ids; ``VISION_FAMILIES`` take ``pixel_values`` (``pixels()``)."""


@pytest.fixture(params=TEXT_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=VISION_FAMILIES)
def vision_family(request) -> str:
    return request.param


def prompt_ids(batch: int = 2, length: int = 7, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def pixels(batch: int = 2, seed: int = 1, size: int = 12) -> torch.Tensor:
    """Random images ``[batch, 3, size, size]`` for the tiny vision families."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


whole_model_jacobian = reference_jacobian
"""``d x^layer_{t_out} / d x^{layer-1}_{t_in}`` by autograd through the whole model's forward
(:func:`alignscope.models.reference.reference_jacobian`: two hooks and ``torch.autograd.functional``)."""


__all__ = [
    "FAMILIES",
    "TEXT_FAMILIES",
    "VISION_FAMILIES",
    "pixels",
    "prompt_ids",
    "tiny_model",
    "whole_model_jacobian",
]


def assert_results_close(actual, expected, atol: float) -> None:
    """Every tensor field of two :class:`ProbeResult` s equal to ``atol`` (NaN where NaN); ``actual`` on the CPU."""
    from alignscope.probing.result import tensor_fields

    for name, kind in tensor_fields(type(expected)):
        a, b = getattr(expected, name), getattr(actual, name)
        for x, y in zip(*(v.values() if kind == "keyed" else [v] for v in (a, b)), strict=True):
            if x is not None:
                assert y.device.type == "cpu", name
                torch.testing.assert_close(y, x, atol=atol, rtol=0, equal_nan=True, msg=name)


def wandb_probe_config(tmp_path, *overrides: str):
    """The probe app's config with W&B on (offline in the tests) for a tiny local model saved in
    ``tmp_path/model`` (seed 5), writing the run folder ``tmp_path/run``; ``overrides`` follow."""
    from hydra import compose, initialize_config_dir

    from alignscope.apps.config import config_dir

    local = save_tiny_local_model(tmp_path / "model", seed=5)
    base = [f"paths.run_dir={tmp_path / 'run'}", "logger=wandb", "model=local", f"model.path={local}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("probe_app", overrides=[*base, *overrides])


def save_tiny_local_model(folder, family: str = "llama", seed: int = 0):
    """A tiny model plus a small byte-level BPE tokenizer saved with save_pretrained (a 'local' zoo model)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from alignscope.apps.prompts import default_prompts

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        default_prompts() * 3, vocab_size=300, min_frequency=1, special_tokens=["<eos>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    model = tiny_model(
        family, seed=seed, vocab_size=300, **({"n_positions": 128} if family == "gpt2" else {})
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def wandb_history_bytes(run_folder, expected: tuple[bytes, ...] = (), wait_s: float = 10.0) -> bytes:
    """The bytes of an offline W&B run's ``run-*.wandb`` file, re-read for up to ``wait_s`` seconds until every
    expected string is in it (the W&B service writes asynchronously)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + wait_s
    while True:
        files = list(Path(run_folder).glob("run-*.wandb"))
        blob = files[0].read_bytes() if files else b""
        if all(e in blob for e in expected) or time.monotonic() > deadline:
            return blob
        time.sleep(0.2)

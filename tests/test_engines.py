"""Every engine agrees with the exact full-sequence engine (issue 5), and the automatic choice."""

from __future__ import annotations

import pytest
import torch

from alignscope import probe
from conftest import prompt_ids, tiny_model

DECODERS = [
    "gpt2",
    "llama",
    "gpt_neox",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "olmo",
    "olmo2",
    "falcon",
    "gpt_neo",
    "mpt",
    "qwen3",
]


@pytest.mark.parametrize("family", DECODERS)
def test_single_token_engine_equals_exact(family):
    model = tiny_model(family)
    ids = prompt_ids(2, 7, seed=11)
    exact = probe(model, ids, tokens="all", keep_jacobians=True, engine="exact")
    single = probe(model, ids, tokens="all", keep_jacobians=True, engine="single_token")
    assert exact.meta["engine"] == "exact" and single.meta["engine"] == "single_token"
    assert torch.allclose(single.jacobians, exact.jacobians, atol=1e-5), float(
        (single.jacobians - exact.jacobians).abs().max()
    )
    assert torch.allclose(single.hidden_states, exact.hidden_states, atol=1e-5)
    assert single.jacobians.abs().max() > 1e-2


def test_single_token_engine_in_float64_and_bfloat16():
    model = tiny_model("llama")
    ids = prompt_ids(1, 6)
    a = probe(model, ids, dtype=torch.float64, keep_jacobians=True, engine="single_token")
    b = probe(model, ids, dtype=torch.float64, keep_jacobians=True, engine="exact")
    # the cached keys and values of earlier tokens come from the model's own float32 forward: agreement is
    # to float32 rounding, not to float64 precision
    assert torch.allclose(a.jacobians, b.jacobians, atol=1e-6)
    half = tiny_model("llama").to(torch.bfloat16)
    c = probe(half, ids, keep_jacobians=True, engine="single_token")
    d = probe(half, ids, keep_jacobians=True, engine="exact")
    assert c.jacobians.dtype == torch.float32 and torch.allclose(c.jacobians, d.jacobians, atol=1e-4)


def test_automatic_choice_and_errors():
    ids = prompt_ids(1, 5)
    assert probe(tiny_model("llama"), ids).meta["engine"] == "single_token"
    assert probe(tiny_model("bert"), ids).meta["engine"] == "exact"
    with pytest.raises(ValueError, match="causal decoder"):
        probe(tiny_model("bert"), ids, engine="single_token")
    with pytest.raises(ValueError, match="unknown engine"):
        probe(tiny_model("llama"), ids, engine="fast")


def test_single_token_leaves_no_cache_state_behind():
    model = tiny_model("llama")
    ids = prompt_ids(1, 6)
    first = probe(model, ids, tokens="all", engine="single_token", keep_jacobians=True)
    again = probe(model, ids, tokens="all", engine="single_token", keep_jacobians=True)
    assert torch.equal(first.jacobians, again.jacobians)

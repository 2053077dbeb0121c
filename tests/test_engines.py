"""Every engine agrees with the exact full-sequence engine, and the automatic choice."""

from __future__ import annotations

import pytest
import torch

from alignscope import probe
from alignscope.probing.engines import exact as exact_engines
from alignscope.probing.plan import Plan
from conftest import prompt_ids, tiny_model

DECODERS = [
    "gpt2",
    "llama",
    "gpt_neox",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3_text",
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


LONG_CONTEXT = {
    "gpt2": {"n_positions": 128},
    "gpt_neo": {"max_position_embeddings": 128},  # its local layers attend to a window of 4 tokens
    "mpt": {"max_seq_len": 128},
    "mistral": {"sliding_window": 16},  # sliding-window caches and masks
    "gemma2": {"sliding_window": 16},
    "gemma3_text": {"sliding_window": 16},
}


COPIES_FROM = 64
"""Cached tokens from which the tests force copies of the token (CUDA's plan; CPUs run none by default)."""
COPIES_ON_CPU = Plan(copies_devices=("cpu",), copies_min_context=COPIES_FROM, copies_chunk=32)


@pytest.mark.parametrize("family", DECODERS)
def test_long_contexts_batched_and_on_copies_equal_exact(family, monkeypatch):
    """At long contexts the default single-token path on CPUs (batched VJPs, the cache a constant) and the
    copies of the token in one sequence (CUDA's plan: their own mask rows, positions and rotary embeddings)
    give the exact Jacobians."""
    from alignscope.models import get_adapter
    from alignscope.models.capture import capture_token_calls, probe_mode, token_copies_function

    model = tiny_model(family, **LONG_CONTEXT.get(family, {}))
    length = COPIES_FROM + 4
    ids = prompt_ids(1, length, seed=4)
    tokens = [COPIES_FROM - 1, length - 1]  # one below the forced threshold, one above
    exact = probe(model, ids, tokens=tokens, keep_jacobians=True, engine="exact")
    single = probe(model, ids, tokens=tokens, keep_jacobians=True)
    assert single.meta["engine"] == "single_token" and single.meta["copies_min_context"] is None
    by_copies, passes = exact_engines.jacobian_by_copies, []
    monkeypatch.setattr(exact_engines, "jacobian_by_copies", lambda *a: passes.append(a[2]) or by_copies(*a))
    copies = probe(model, ids, tokens=tokens, keep_jacobians=True, plan=COPIES_ON_CPU)
    assert copies.meta["copies_min_context"] == COPIES_FROM
    # the token above the threshold ran on copies in every block (MPT, GPT-Neo: batched), the one below not
    assert passes == ([] if family in ("mpt", "gpt_neo") else [32] * len(copies.layers))
    scale = max(1.0, float(exact.jacobians.abs().max()))
    for result in (single, copies):
        assert torch.allclose(result.jacobians, exact.jacobians, atol=1e-5 * scale), float(
            (result.jacobians - exact.jacobians).abs().max()
        )
    adapter = get_adapter(model)
    with probe_mode(model):
        blocks = adapter.blocks(model)
        call = capture_token_calls(model, adapter, blocks, ids, length - 1)[1]
        supported = token_copies_function(blocks[1], call, adapter, torch.float32) is not None
    # MPT passes an ALiBi position_bias the copies cannot rewrite; GPT-Neo masks its local layers inside
    assert supported == (family not in ("mpt", "gpt_neo"))


@pytest.mark.parametrize("family", DECODERS)
def test_cuda_plan_equals_exact_on_the_cpu(family, monkeypatch):
    """What probe() runs on CUDA, here on the CPU: copies (``Plan.copies``, here from the first token on),
    GPU chunk sizes, and the Gram-eigendecomposition analysis; Jacobians and metrics must not change."""
    model = tiny_model(family)
    ids = prompt_ids(1, 9, seed=12)
    ks = (10, 30, 50)
    exact = probe(model, ids, tokens="all", ks=ks, keep_jacobians=True, engine="exact")
    # copies for every token, several passes per Jacobian, the Gram analysis
    cuda_like_plan = Plan(copies_devices=("cpu",), copies_min_context=0, copies_chunk=24, analysis_svd="gram")
    by_copies, calls = exact_engines.jacobian_by_copies, []
    monkeypatch.setattr(exact_engines, "jacobian_by_copies", lambda *a: calls.append(a[2]) or by_copies(*a))
    cuda_like = probe(
        model, ids, tokens="all", ks=ks, keep_jacobians=True, engine="single_token", plan=cuda_like_plan
    )
    assert cuda_like.meta["copies_min_context"] == 0 and cuda_like.meta["analysis_svd"] == "gram"
    assert exact.meta["analysis_svd"] == "lapack"  # CPUs: the top-K route through SciPy's LAPACK
    # every token and block ran on copies, 24 per pass (MPT, GPT-Neo: batched VJPs, as on CPUs)
    assert calls == ([] if family in ("mpt", "gpt_neo") else [24] * (9 * len(cuda_like.layers)))
    assert torch.allclose(cuda_like.jacobians, exact.jacobians, atol=1e-5), float(
        (cuda_like.jacobians - exact.jacobians).abs().max()
    )
    assert torch.allclose(cuda_like.singular_values, exact.singular_values, atol=1e-5)
    for k in ks:
        assert torch.allclose(cuda_like.coupling[k], exact.coupling[k], atol=1e-4)
        assert torch.allclose(cuda_like.coupling_vju[k], exact.coupling_vju[k], atol=1e-4)
        assert torch.allclose(cuda_like.alignment[k], exact.alignment[k], atol=1e-4)


def test_token_chunk_on_cuda_follows_the_row_budget():
    plan = Plan()
    assert plan.token_chunk(63, "cuda", 4096) == plan.cuda_token_chunk_max == 1024
    assert plan.token_chunk(2047, "cuda", 4096) == 2**30 // (2048 * 4096)
    assert plan.token_chunk(10**6, "cuda", 4096) == 32
    # CPUs: rows x (t + 1) within cpu_row_budget, in [32, 1024]
    assert plan.token_chunk(127) == 1024 and plan.token_chunk(2047) == 2**18 // 2048
    assert plan.token_chunk(10**6) == 32
    assert Plan(cpu_row_budget=2**12).token_chunk(127) == 32  # the budget is read from the plan
    assert plan.copies("cpu") is None and plan.copies("cuda") == (128, 1024)
    assert plan.copies("cuda", sketch=True) == (256, 256)


@pytest.mark.parametrize("copies", [False, True])
def test_long_contexts_with_sdpa_bfloat16_and_float64(copies):
    """The batched single-token path (sdpa written out with the cache a constant) and the copies path."""
    plan = COPIES_ON_CPU if copies else Plan()
    ids = prompt_ids(1, COPIES_FROM + 2, seed=6)
    model = tiny_model("llama")
    for kwargs, atol in (({"attention": "sdpa"}, 1e-5), ({"dtype": torch.float64}, 1e-6)):
        a = probe(model, ids, keep_jacobians=True, plan=plan, **kwargs)
        b = probe(model, ids, keep_jacobians=True, engine="exact", **kwargs)
        assert torch.allclose(a.jacobians, b.jacobians, atol=atol), (
            kwargs,
            float((a.jacobians - b.jacobians).abs().max()),
        )
    half = tiny_model("llama").to(torch.bfloat16)
    c = probe(half, ids, keep_jacobians=True, plan=plan)
    d = probe(half, ids, keep_jacobians=True, engine="exact")
    assert c.jacobians.dtype == torch.float32 and torch.allclose(c.jacobians, d.jacobians, atol=1e-4)


def test_a_new_engine_is_one_class(monkeypatch):
    """An engine written as one subclass and registered by name runs through probe() and its one analysis:
    here the residual Jacobians by torch.autograd.functional.jacobian of each block's full-sequence call
    (independent of the reverse-mode engines), which must give the exact engine's numbers."""
    from alignscope.models.capture import block_function, capture_block_calls
    from alignscope.probing import engines
    from alignscope.probing.engines.base import chain_gap, trajectory

    class FunctionalEngine(engines.ExactEngine):
        name = "functional"

        def jacobians(self, target, ids, positions, bar):
            calls = capture_block_calls(target.model, target.adapter, target.blocks, ids)
            for t in positions:
                jac = []
                for layer in target.probed:
                    fn = block_function(target.blocks[layer], calls[layer], target.adapter, target.dtype)
                    x = calls[layer].input[0].to(target.dtype)

                    def row(v, x=x, fn=fn, t=t):
                        return fn(torch.cat([x[:t], v[None], x[t + 1 :]])[None])[0, t]

                    full = torch.autograd.functional.jacobian(row, x[t])
                    jac.append(full - torch.eye(len(full)))
                    bar.update(1)
                yield t, torch.stack(jac), trajectory(calls, t).to(target.dtype), chain_gap(calls)

    monkeypatch.setitem(engines.ENGINES, "functional", FunctionalEngine)
    model, ids = tiny_model("llama"), prompt_ids(1, 7, seed=3)
    new = probe(model, ids, tokens=[2, 6], ks=(2, 4), keep_jacobians=True, engine="functional")
    exact = probe(model, ids, tokens=[2, 6], ks=(2, 4), keep_jacobians=True, engine="exact")
    assert new.meta["engine"] == "functional"
    assert torch.allclose(new.jacobians, exact.jacobians, atol=1e-5)
    for k in (2, 4):
        assert torch.allclose(new.coupling[k], exact.coupling[k], atol=1e-4)
        assert torch.allclose(new.alignment[k], exact.alignment[k], atol=1e-4)
    assert torch.allclose(new.linearization_cosine, exact.linearization_cosine, atol=1e-5)
    assert torch.allclose(new.stable_rank, exact.stable_rank, atol=1e-4)


@pytest.mark.parametrize(("family", "takes_it"), [("llama", True), ("bert", False)])
def test_capture_passes_ask_for_the_last_logits_only_where_the_model_takes_it(family, takes_it):
    """Capturing forwards never read the logits: ``logits_to_keep=1`` where the model's forward takes it
    (no ``[T, vocab]`` head product over the prompt), nothing where it does not."""
    import functools
    import inspect

    from alignscope.models import get_adapter
    from alignscope.models.capture import capture_block_calls, capture_tokens_calls

    model = tiny_model(family)
    assert ("logits_to_keep" in inspect.signature(model.forward).parameters) == takes_it
    seen: list[dict] = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        seen.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = spy
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    ids = prompt_ids(1, 6)
    capture_block_calls(model, adapter, blocks, ids)
    if takes_it:
        list(capture_tokens_calls(model, adapter, blocks, ids, [3, 5]))
    assert seen and all(("logits_to_keep" in kw) == takes_it for kw in seen)
    assert all(kw["logits_to_keep"] == 1 for kw in seen if takes_it)

"""The engine's Jacobians against autograd through the whole model's forward, for every family."""

from __future__ import annotations

import pytest
import torch

from alignscope.autodiff.jacobian import ReverseModeEngine, make_engine, residual_jacobian
from alignscope.models import get_adapter
from alignscope.models.capture import block_function, capture_block_calls, probe_mode
from alignscope.probing.probe import token_jacobians
from conftest import prompt_ids, tiny_model, whole_model_jacobian


def captured(model, ids):
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    return adapter, blocks, capture_block_calls(model, adapter, blocks, ids)


def test_block_recall_reproduces_hidden_states(family):
    model = tiny_model(family)
    ids = prompt_ids(1, 9)
    with probe_mode(model):
        adapter, blocks, calls = captured(model, ids)
        for layer, call in enumerate(calls):
            fn = block_function(blocks[layer], call, adapter, torch.float32)
            with torch.no_grad():
                out = fn(call.input.expand(3, -1, -1))
            assert torch.allclose(out, call.output.expand(3, -1, -1), atol=1e-6), layer
    # the model's own hidden states (intermediate entries; the last one may carry the final norm)
    with torch.no_grad():
        hf = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(len(calls) - 1):
        assert torch.allclose(hf[layer + 1], calls[layer].output, atol=1e-5), layer


@pytest.mark.parametrize("layer", [0, 2])
def test_engine_matches_whole_model_autograd(family, layer):
    model = tiny_model(family)
    ids = prompt_ids(1, 6, seed=3)
    t = 3 if family != "bert" else 2
    expected = whole_model_jacobian(model, ids, layer, t, t)
    with probe_mode(model):
        adapter, blocks, calls = captured(model, ids)
        fn = block_function(blocks[layer], calls[layer], adapter, torch.float32)
        got = ReverseModeEngine(chunk_size=8)(
            fn, calls[layer].input[0], torch.tensor([t]), torch.tensor([t])
        )[0]
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    assert expected.abs().max() > 1e-2  # non-trivial


def test_other_tokens_are_held_fixed():
    """J_t excludes paths through other tokens: perturbing all tokens at once gives J_t plus the
    cross-token terms, and each cross-token term matches the whole model's."""
    model = tiny_model("llama")
    ids = prompt_ids(1, 6, seed=4)
    layer, t = 1, 4
    total = whole_model_jacobian(model, ids, layer, list(range(6)), t)
    engine_pairs = token_jacobians(model, ids, layers=[layer], pairs=[(s, t) for s in range(6)])[:, 0]
    diag = engine_pairs[t]
    assert (total - diag).abs().max() > 1e-3  # other tokens do matter for the total derivative ...
    assert torch.allclose(engine_pairs.sum(0), total, atol=1e-5)  # ... and the parts add up exactly
    cross = whole_model_jacobian(model, ids, layer, 1, t)
    assert torch.allclose(engine_pairs[1], cross, atol=1e-5)
    # causal: a later token cannot influence an earlier one
    later = token_jacobians(model, ids, layers=[layer], pairs=[(5, 2)])
    assert torch.count_nonzero(later) == 0


def test_vectorized_and_loop_engines_agree_in_float64():
    model = tiny_model("gpt2")
    ids = prompt_ids(1, 5)
    with probe_mode(model):
        adapter, blocks, calls = captured(model, ids)
        fn = block_function(blocks[1], calls[1], adapter, torch.float64)
        x = calls[1].input[0].double()
        t = torch.tensor([0, 2, 4])
        a = ReverseModeEngine(chunk_size=5)(fn, x, t, t)
        b = ReverseModeEngine(vectorize=False)(fn, x, t, t)
        c = ReverseModeEngine(chunk_size=64, max_rows=1)(fn, x, t, t)  # one pair per forward pass
    assert a.dtype == torch.float64
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, c, atol=1e-12)


def test_residual_jacobian_subtracts_identity():
    J = torch.eye(3) * 2
    assert torch.equal(residual_jacobian(J), torch.eye(3))


def test_engine_options_are_validated():
    with pytest.raises(ValueError, match="chunk_size"):
        ReverseModeEngine(chunk_size=0)
    with pytest.raises(ValueError, match="unknown Jacobian engine"):
        make_engine("nope")
    with pytest.raises(TypeError):
        make_engine(object())


def test_out_of_memory_halves_the_rows_instead_of_looping(monkeypatch):
    """A (simulated) out-of-memory error in a batched product or a pass of copies retries with half the
    rows, with a warning; the Jacobian is unchanged and no row loop runs."""
    from alignscope.autodiff.jacobian import jacobian_by_copies

    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))

    def block_fn(h):  # [n, T, d] -> [n, T, d], token-wise
        return torch.tanh(h @ weight)

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2])
    want = ReverseModeEngine(chunk_size=16)(block_fn, x, t, t)
    copies_want = jacobian_by_copies(lambda rows: torch.tanh(rows @ weight), x[2], 16)
    grad, calls = torch.autograd.grad, []

    def limited(outputs, inputs, grad_outputs=None, **kwargs):
        rows = grad_outputs.shape[0] if grad_outputs is not None else 0
        calls.append((rows, kwargs.get("is_grads_batched", False)))
        if rows > 4:
            raise torch.OutOfMemoryError("simulated: too many rows")
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", limited)
    with pytest.warns(UserWarning, match="retrying with") as record:
        got = ReverseModeEngine(chunk_size=16)(block_fn, x, t, t)
    assert [str(w.message) for w in record] == [
        f"out of memory; retrying with {n} rows per batched VJP" for n in (8, 4)
    ]
    assert torch.allclose(got, want, atol=1e-6)
    assert all(batched for _, batched in calls) and [r for r, _ in calls if r <= 4] == [4, 4, 4, 4]
    with pytest.warns(UserWarning, match="retrying with"):
        copies_got = jacobian_by_copies(lambda rows: torch.tanh(rows @ weight), x[2], 16)
    assert torch.allclose(copies_got, copies_want, atol=1e-6)

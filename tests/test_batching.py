"""batchable_backward: same forward values, backward (batched and double) equal to torch's own formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignscope.batching import batchable_backward

OPS = {
    "silu": F.silu,
    "silu module": torch.nn.SiLU(),
    "gelu": F.gelu,
    "gelu tanh": lambda t: F.gelu(t, approximate="tanh"),
    "softmax": lambda t: F.softmax(t, dim=-1),
    "softmax dtype": lambda t: F.softmax(t, dim=0, dtype=torch.float32),
    "torch.softmax": lambda t: torch.softmax(t, 1),
    "torch.softmax dtype": lambda t: torch.softmax(t, 1, torch.float32),
    "Tensor.softmax dtype": lambda t: t.softmax(0, torch.float32),
    "Tensor.softmax": lambda t: t.softmax(dim=-1),
}


@pytest.mark.parametrize("name", OPS)
def test_batchable_backward_matches_torch(name):
    f = OPS[name]
    x = (
        3 * torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ).requires_grad_()
    native = f(x)
    with batchable_backward():
        routed = f(x)
    assert torch.equal(routed, native) and routed.dtype == native.dtype  # forward values bit-identical
    assert type(routed.grad_fn).__name__.startswith("_") and routed.grad_fn is not native.grad_fn
    rows = torch.randn(6, *native.shape, generator=torch.Generator().manual_seed(1), dtype=native.dtype)
    (want,) = torch.autograd.grad(native, x, rows, is_grads_batched=True, create_graph=True)
    (got,) = torch.autograd.grad(routed, x, rows, is_grads_batched=True, create_graph=True)
    tol = 1e-6 if native.dtype == torch.float32 else 1e-12
    assert torch.allclose(got.double(), want.double(), atol=tol, rtol=0)
    v = torch.randn_like(x)  # double backward (the randomized engine's JVPs)
    (want2,) = torch.autograd.grad((want[2] * v).sum(), x)
    (got2,) = torch.autograd.grad((got[2] * v).sum(), x)
    assert torch.allclose(got2.double(), want2.double(), atol=tol, rtol=0)


def test_batchable_backward_leaves_other_calls_alone():
    x = torch.randn(4, 3)  # no grad: plain kernels
    with batchable_backward():
        assert F.silu(x).grad_fn is None and torch.equal(F.softmax(x, -1), torch.softmax(x, -1))
        y = torch.tanh(x.requires_grad_())
    assert type(y.grad_fn).__name__ == "TanhBackward0"
    z = F.silu(x)  # outside the context: torch's own backward
    assert type(z.grad_fn).__name__ == "SiluBackward0"


def test_no_backward_op_runs_row_by_row_in_a_single_token_jacobian(monkeypatch):
    """The profiler counts kernel calls: without batchable_backward, vmap runs SiLU's and softmax's backward
    once per identity row (d of them, in one product here); with it, a few times per product."""
    import contextlib

    from alignscope import jacobian
    from alignscope.capture import probe_mode
    from conftest import tiny_model

    model = tiny_model("llama")  # SiLU MLP, eager softmax attention
    block = model.model.layers[0]
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = model.model.rotary_emb(x, torch.arange(5)[None])
    mask = torch.full((5, 5), float("-inf")).triu(1)[None, None]

    def fn(h):
        out = block(h, attention_mask=mask, position_embeddings=pos)
        return out[0] if isinstance(out, tuple) else out

    def row_loops() -> tuple[dict[str, int], torch.Tensor]:
        with torch.profiler.profile() as prof:
            jac = jacobian.ReverseModeEngine(chunk_size=64)(fn, x[0], torch.tensor([4]), torch.tensor([4]))
        watched = ("aten::silu_backward", "aten::_softmax_backward_data", "aten::index_put_")
        return {e.key: e.count for e in prof.key_averages() if e.key in watched}, jac

    with probe_mode(model):  # eager attention: softmax in the graph
        with_rule, jac = row_loops()
        monkeypatch.setattr(jacobian, "batchable_backward", contextlib.nullcontext)
        without, plain = row_loops()
    assert all(count < 8 for count in with_rule.values()), with_rule
    d = model.config.hidden_size
    assert without.get("aten::silu_backward", 0) >= d and without.get("aten::_softmax_backward_data", 0) >= d
    assert torch.allclose(jac, plain, atol=1e-6)

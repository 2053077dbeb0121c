"""batchable_backward: same forward values, backward (batched and double) equal to torch's own formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignscope.autodiff.batching import batchable_backward

OPS = {
    "silu": F.silu,
    "silu module": torch.nn.SiLU(),
    "gelu": F.gelu,
    "gelu tanh": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "Tensor.tanh": lambda t: t.tanh(),
    "layer_norm": lambda t: F.layer_norm(t, (7,)),
    "layer_norm affine": lambda t: F.layer_norm(
        t, (7,), torch.linspace(0.5, 2, 7, dtype=t.dtype), torch.ones(7, dtype=t.dtype)
    ),
    "layer_norm 2d": lambda t: F.layer_norm(t, (5, 7), eps=1e-3),
    "list index": lambda t: t[..., [-2], :],
    "list index run": lambda t: t[:, [1, 2, 3]],
    "list index last": lambda t: t[:, [-1]],
    "softmax": lambda t: F.softmax(t, dim=-1),
    "softmax dtype": lambda t: F.softmax(t, dim=0, dtype=torch.float32),
    "torch.softmax": lambda t: torch.softmax(t, 1),
    "torch.softmax dtype": lambda t: torch.softmax(t, 1, torch.float32),
    "Tensor.softmax dtype": lambda t: t.softmax(0, torch.float32),
    "Tensor.softmax": lambda t: t.softmax(dim=-1),
}


def _attention_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    return q, k, v


ATTENTION = {
    "causal": dict(is_causal=True),
    "float mask": dict(attn_mask=torch.randn(5, 5, dtype=torch.float64)),
    "bool mask": dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()),
    "scale": dict(is_causal=True, scale=0.3),
}


@pytest.mark.parametrize("name", ATTENTION)
def test_written_out_attention_matches_the_sdpa_kernel(name):
    q, k, v = _attention_inputs()
    native = F.scaled_dot_product_attention(q, k, v, **ATTENTION[name])
    with batchable_backward():
        routed = F.scaled_dot_product_attention(q, k, v, **ATTENTION[name])
    assert type(routed.grad_fn).__name__ != type(native.grad_fn).__name__
    assert torch.allclose(routed, native, atol=1e-12)
    rows = torch.randn(3, *native.shape, dtype=native.dtype)
    want = torch.autograd.grad(native, (q, k, v), rows, is_grads_batched=True)
    got = torch.autograd.grad(routed, (q, k, v), rows, is_grads_batched=True)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want, strict=True))


def test_written_out_attention_with_grouped_keys():
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 1, 2, 3, 8, dtype=torch.float64).unbind(0)
    native = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with batchable_backward():
        routed = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(routed, native, atol=1e-12)


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
    assert type(routed.grad_fn) is not type(native.grad_fn)  # recorded differently
    rows = torch.randn(16, *native.shape, generator=torch.Generator().manual_seed(1), dtype=native.dtype)
    (want,) = torch.autograd.grad(native, x, rows, is_grads_batched=True, create_graph=True)
    with torch.profiler.profile() as prof:
        (got,) = torch.autograd.grad(routed, x, rows, is_grads_batched=True, create_graph=True)
    per_row = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.count >= 16}
    assert not {k for k in per_row if k not in ("aten::select", "aten::as_strided")}, per_row  # no op per row
    tol = 1e-6 if native.dtype == torch.float32 else 1e-12
    assert torch.allclose(got.double(), want.double(), atol=tol, rtol=0)
    if not want.requires_grad:  # a linear map (indexing): no second derivative
        return
    v = torch.randn_like(x)  # double backward (the randomized engine's JVPs)
    (want2,) = torch.autograd.grad((want[2] * v).sum(), x)
    (got2,) = torch.autograd.grad((got[2] * v).sum(), x)
    assert torch.allclose(got2.double(), want2.double(), atol=tol, rtol=0)


def test_only_plain_list_indices_become_slices():
    from alignscope.autodiff.batching import _as_basic_index

    assert _as_basic_index((Ellipsis, [-2], slice(None))) == ((Ellipsis, slice(-2, -1), slice(None)), 1)
    assert _as_basic_index((slice(None), [-1])) == ((slice(None), slice(-1, None)), 1)
    assert _as_basic_index([0, 1]) == ((slice(0, 2),), 0)
    for index in (
        (0, slice(None), [1]),
        ([1, 3],),
        ([-1, 0],),
        ([1], [2]),
        (torch.tensor([1]),),
        ([True],),
        3,
    ):
        assert _as_basic_index(index) is None, index
    x = torch.arange(24.0).reshape(2, 3, 4).requires_grad_()
    with batchable_backward():
        routed = x[0, :, [1]]  # an int beside the list: left to torch
    assert type(routed.grad_fn).__name__ == "IndexBackward0" and torch.equal(routed, x.detach()[0, :, [1]])
    with batchable_backward():
        assert type(x[None, ..., [1, 2]].grad_fn).__name__ == "SliceBackward0"
        assert torch.equal(x[None, ..., [1, 2]], x.detach()[None, ..., [1, 2]])
        with pytest.raises(IndexError):  # out of range: torch's error, not a shorter slice
            x[:, [2, 3]]


def test_layer_norm_parameter_gradients_match_torch():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 6, dtype=torch.float64)
    want = torch.autograd.grad(F.layer_norm(x, (6,), w, b), (x, w, b), g)
    with batchable_backward():
        routed = F.layer_norm(x, (6,), w, b)
    got = torch.autograd.grad(routed, (x, w, b), g)
    assert all(torch.allclose(a, c, atol=1e-12) for a, c in zip(got, want, strict=True))


def test_batchable_backward_leaves_other_calls_alone():
    x = torch.randn(4, 3)  # no grad: plain kernels
    with batchable_backward():
        assert F.silu(x).grad_fn is None and torch.equal(F.softmax(x, -1), torch.softmax(x, -1))
        y = torch.sigmoid(x.requires_grad_())
    assert type(y.grad_fn).__name__ == "SigmoidBackward0"
    z = F.silu(x)  # outside the context: torch's own backward
    assert type(z.grad_fn).__name__ == "SiluBackward0"


def test_no_backward_op_runs_row_by_row_in_a_single_token_jacobian(monkeypatch):
    """The profiler counts kernel calls: without batchable_backward, vmap runs SiLU's and softmax's backward
    once per identity row (d of them, in one product here); with it, a few times per product."""
    import contextlib

    from alignscope.autodiff import jacobian
    from alignscope.models.capture import probe_mode
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
        watched = ("aten::silu_backward", "aten::_softmax_backward_data", "aten::index_put_")  # llama's
        return {e.key: e.count for e in prof.key_averages() if e.key in watched}, jac

    with probe_mode(model):  # eager attention: softmax in the graph
        with_rule, jac = row_loops()
        monkeypatch.setattr(jacobian, "batchable_backward", contextlib.nullcontext)
        without, plain = row_loops()
    assert all(count < 8 for count in with_rule.values()), with_rule
    d = model.config.hidden_size
    assert without.get("aten::silu_backward", 0) >= d and without.get("aten::_softmax_backward_data", 0) >= d
    assert torch.allclose(jac, plain, atol=1e-6)


@pytest.mark.parametrize(
    "family",
    ["gpt2", "llama", "gpt_neox", "gemma2", "phi", "olmo", "falcon", "gpt_neo", "mpt", "qwen3", "bert"],
)
def test_no_family_runs_a_backward_kernel_per_row(family):
    """Every activation, norm, attention and indexing form in the supported families: no backward kernel
    (nor index_put) runs once per identity row in the engines' batched products."""
    from alignscope import probe
    from conftest import prompt_ids, tiny_model

    model = tiny_model(family)
    d = model.config.hidden_size
    engines = ["exact"] if family == "bert" else ["exact", "single_token"]
    for engine in engines:
        with torch.profiler.profile() as prof:
            probe(model, prompt_ids(1, 6), layers=[0], ks=(4,), engine=engine, progress=False)
        per_row = {
            e.key: e.count
            for e in prof.key_averages()
            if e.count >= d and ("backward" in e.key.lower() or "index_put" in e.key)
        }
        assert not per_row, (engine, per_row)

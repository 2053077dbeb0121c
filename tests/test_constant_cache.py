"""Attention over a constant KV cache (alignscope.autodiff.constant_cache): products part by part, equal to the joined
computation, and no gradient into the cached keys and values."""

from __future__ import annotations

import pytest
import torch

from alignscope.autodiff import constant_cache
from alignscope.autodiff.batching import batchable_backward
from alignscope.autodiff.constant_cache import parts_of, per_matrix_matmul, split_matmul


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("right", [True, False])
def test_per_matrix_matmul_matches_torch_and_batches_its_backward(right):
    """Values, batched VJPs, double backward and forward mode equal torch.matmul's; the batched backward runs
    one product per head, not one per cotangent row (the profiler counts them)."""
    g = _gen()
    x = _randn(2, 3, 4, 5, g=g, grad=True)  # [batch, heads, M, K] (right) or [.., K, N]
    c = _randn(3, 5, 6, g=g) if right else _randn(3, 6, 4, g=g)

    def ours(t):
        return per_matrix_matmul(t, c, right)

    def plain(t):
        return torch.matmul(t, c) if right else torch.matmul(c, t)

    assert torch.allclose(ours(x), plain(x))
    rows = 64
    cotangents = _randn(rows, *plain(x).shape, g=g)
    y = ours(x)
    with torch.profiler.profile() as prof:
        (batched,) = torch.autograd.grad(y, x, cotangents, is_grads_batched=True)
    products = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm"))
    assert products < rows, products  # per matrix (2 x 3 here, each counted by a few kernels), not per row
    (reference,) = torch.autograd.grad(plain(x), x, cotangents, is_grads_batched=True)
    assert torch.allclose(batched, reference)
    # double backward, batched: d/du <J^T u, v> = J v
    u = torch.zeros_like(plain(x), requires_grad=True)
    (transposed,) = torch.autograd.grad(ours(x), x, u, create_graph=True)
    tangents = _randn(7, *x.shape, g=g)
    (jv,) = torch.autograd.grad(transposed, u, tangents, is_grads_batched=True)
    assert torch.allclose(jv, torch.stack([plain(t) for t in tangents]))
    _, forward = torch.func.jvp(ours, (x.detach(),), (tangents[0],))
    assert torch.allclose(forward, plain(tangents[0]))


def _joined(constant, new, dim):
    with batchable_backward():
        out = torch.cat([constant, new], dim)
    return out


def test_cache_join_remembers_its_parts_only_for_constant_then_new():
    g = _gen(2)
    constant, new = _randn(1, 2, 5, 4, g=g), _randn(1, 2, 1, 4, g=g, grad=True)
    parts = parts_of(_joined(constant, new, -2))
    assert parts is not None and parts.dim == 2 and parts.constant is constant and parts.new is new
    assert parts_of(_joined(new, constant, -2)) is None  # new first: not a cache update
    assert parts_of(_joined(constant, new.detach(), -2)) is None  # nothing to differentiate
    with batchable_backward():
        assert parts_of(torch.cat([constant, new, new], -2)) is None


def test_modified_joined_tensor_forgets_its_parts():
    g = _gen(3)
    constant, new = _randn(2, 5, 4, g=g), _randn(2, 1, 4, g=g, grad=True)
    out = _joined(constant, new, -2)
    with torch.no_grad():
        out.mul_(2)
    assert parts_of(out) is None
    out = _joined(constant, new, -2)
    constant.add_(1)
    assert parts_of(out) is None


def _attention_like(query, key, value, groups):
    """Llama's eager attention after the cache update: repeat_kv, q k^T, softmax, p v."""
    b, h, s, e = key.shape
    key = key[:, :, None, :, :].expand(b, h, groups, s, e).reshape(b, h * groups, s, e)
    value = value[:, :, None, :, :].expand(b, h, groups, s, e).reshape(b, h * groups, s, e)
    scores = torch.matmul(query, key.transpose(2, 3)) * 0.5
    return torch.matmul(torch.softmax(scores, -1), value)


def test_attention_over_a_joined_cache_matches_the_joined_computation():
    """Values and batched VJPs equal those through the joined tensors, and no gradient reaches them."""
    g = _gen(4)
    cached_k, cached_v = _randn(2, 1, 2, 6, 4, g=g)
    x = _randn(1, 2, 1, 4, g=g, grad=True)  # the token's own key/value/query source
    query = _randn(1, 4, 1, 4, g=g)

    def run(split: bool):
        hits = []
        with batchable_backward():
            new_k, new_v, q = x * 1.5, x.tanh(), query * x.sum()
            key = torch.cat([cached_k, new_k], -2)
            value = torch.cat([cached_v, new_v], -2)
            if not split:  # forget the parts: the ordinary computation through the joined tensors
                for t in (key, value):
                    delattr(t, "_alignscope_parts")
            key.register_hook(lambda grad: hits.append(grad))
            out = _attention_like(q, key, value, groups=2)
        cotangents = _randn(5, *out.shape, g=_gen(5))
        (grad,) = torch.autograd.grad(out, x, cotangents, is_grads_batched=True)
        return out, grad, hits

    out, grad, hits = run(split=True)
    reference, reference_grad, reference_hits = run(split=False)
    assert torch.allclose(out, reference) and torch.allclose(grad, reference_grad)
    assert not hits and reference_hits  # the joined key gets no gradient, only its new part


def test_products_with_each_joined_dimension():
    """Columns, contracted rows, rows, contracted columns: each part-by-part product equals a @ b."""
    g = _gen(6)
    a = _randn(3, 2, 5, g=g)
    b_const, b_new = _randn(3, 5, 4, g=g), _randn(3, 5, 2, g=g, grad=True)
    b = _joined(b_const, b_new, -1)  # joined columns
    assert torch.allclose(split_matmul(a, b), a @ b)
    c_const, c_new = _randn(3, 3, 4, g=g), _randn(3, 2, 4, g=g, grad=True)
    c = _joined(c_const, c_new, -2)  # joined along the contracted dimension
    p = _randn(3, 2, 5, g=g)
    assert torch.allclose(split_matmul(p, c), p @ c)
    right = _randn(3, 4, 6, g=g)
    assert torch.allclose(split_matmul(c, right), c @ right)  # joined rows of the left operand
    left = _joined(_randn(3, 2, 3, g=g), _randn(3, 2, 2, g=g, grad=True), -1)
    r = _randn(3, 5, 4, g=g)
    assert torch.allclose(split_matmul(left, r), left @ r)  # joined contracted columns of the left operand
    batch_joined = _joined(_randn(2, 5, 4, g=g), _randn(1, 5, 4, g=g, grad=True), 0)
    assert split_matmul(_randn(3, 2, 5, g=g), batch_joined) is None  # a batch dimension: torch's


def test_shape_operations_keep_or_drop_the_parts():
    g = _gen(7)
    out = _joined(_randn(2, 3, 5, 4, g=g), _randn(2, 3, 1, 4, g=g, grad=True), -2)
    with batchable_backward():
        kept = {
            "transpose": out.transpose(-2, -1),
            "index": out[:, :, None],
            "expand": out[:, :, None].expand(2, 3, 2, 6, 4),
            "reshape": out[:, :, None].expand(2, 3, 2, 6, 4).reshape(2, 6, 6, 4),
            "scaled": out * 0.5,
            "repeat_interleave": out.repeat_interleave(2, 1),
        }
        dropped = {"merged": out.reshape(2, 3, 24), "sliced": out[..., 1:, :], "by_tensor": out * out}
    for name, t in kept.items():
        parts = parts_of(t)
        assert parts is not None, name
        assert torch.equal(torch.cat([parts.constant, parts.new], parts.dim), t.detach()), name
    for name, t in dropped.items():
        assert parts_of(t) is None, name


def test_single_token_calls_of_every_causal_family_give_the_cache_no_gradient(monkeypatch):
    """In every causal family's single-token Jacobian the cache joins go part by part: no gradient reaches
    the joined keys and values (and it does when the product is not split: the check can fail)."""
    from alignscope import probe
    from alignscope.models.tiny import TINY_CONFIGS, VISION_FAMILIES
    from conftest import prompt_ids, tiny_model

    joined = constant_cache.joined
    hits: list[str] = []

    def watched(tensors, dim=0):
        out = joined(tensors, dim)
        if out is not None:
            out.register_hook(lambda grad: hits.append(family))
        return out

    monkeypatch.setattr(constant_cache, "joined", watched)
    causal = [f for f in sorted(TINY_CONFIGS) if f not in ("bert", "roberta", *VISION_FAMILIES)]
    for family in causal:
        model = tiny_model(family)
        probe(model, prompt_ids(1, 6), layers=[0], ks=(4,), engine="single_token", progress=False)
    assert not hits
    monkeypatch.setattr(constant_cache, "split_matmul", lambda a, b: None)
    family = "llama"
    probe(tiny_model(family), prompt_ids(1, 6), layers=[0], ks=(4,), engine="single_token", progress=False)
    assert hits


def test_single_token_products_fold_rows_into_matrix_products():
    """In a single-token Jacobian no product runs once per identity row: the cached part is one 2-D product
    per head over all rows, the token's own key and value act elementwise (no ``bmm`` whose batch holds
    a matrix-vector or outer product per row)."""
    from alignscope import probe
    from conftest import prompt_ids, tiny_model

    model = tiny_model("llama")
    rows = model.config.hidden_size
    with torch.profiler.profile(record_shapes=True) as prof:
        probe(model, prompt_ids(1, 12), layers=[0], ks=(4,), engine="single_token", progress=False)
    per_row = [
        shapes
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::bmm"
        for shapes in [e.input_shapes]
        if shapes and len(shapes[0]) == 3 and shapes[0][0] >= rows and 1 in shapes[0][1:]
    ]
    assert not per_row, per_row

"""Degenerate cases of probe(): non-finite and zero Jacobians, one probed block, overflow, prompts beyond the
model's context, bad chunk sizes. Every engine behaves alike, and every NaN scalar comes with a message."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from alignscope import DegenerateResultWarning, ProbeResult, probe
from alignscope.probing.degenerate import degeneracies, explain
from conftest import prompt_ids, tiny_model

ENGINES = ["exact", "single_token", "randomized"]


def nan_weight_model():
    """GPT-2 with one NaN weight in block 1: blocks 1 and 2 have non-finite Jacobians."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
    return model


def zero_branch_model():
    """GPT-2 whose block 1 adds nothing (attention and MLP output projections zero): x^2 = x^1, J_1 = 0."""
    model = tiny_model("gpt2")
    block = model.transformer.h[1]
    with torch.no_grad():
        for linear in (block.attn.c_proj, block.mlp.c_proj):
            linear.weight.zero_()
            linear.bias.zero_()
    return model


def overflow_model():
    """GPT-2 whose block 1 MLP overflows float32 in its Jacobian (and block 2's output)."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(1e20)
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e20)
    return model


def probe_warned(model, ids, **kwargs):
    """probe() and the DegenerateResultWarning messages it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = probe(model, ids, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, DegenerateResultWarning)]


def assert_every_nan_scalar_explained(res):
    covered = [prefix for d in degeneracies(res) for prefix in d.scalars]
    nan = [name for name, value in res.scalars().items() if math.isnan(value)]
    assert nan, "the case should make some scalar NaN"
    assert all(any(name.startswith(p) for p in covered) for name in nan), nan
    assert not any("not identified" in m for m in res.meta["warnings"])


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_jacobian_is_flagged_by_every_engine(engine):
    res, issued = probe_warned(nan_weight_model(), prompt_ids(2, 5), engine=engine)
    assert res.meta["engine"] == engine
    assert res.nonfinite.tolist() == [[False, True, True]] * 2
    assert torch.isnan(res.singular_values[:, 1:]).all() and torch.isfinite(res.singular_values[:, 0]).all()
    for k in res.ks:
        for mats in (res.coupling[k], res.coupling_vju[k], res.alignment[k]):
            assert torch.isnan(mats[:, 1:, :]).all() and torch.isnan(mats[:, :, 1:]).all()
            assert torch.isfinite(mats[:, 0, 0]).all()
    assert res.scalars()["nonfinite/jacobians"] == 4.0
    assert issued == res.meta["warnings"]
    assert any(m.startswith("block 1's residual Jacobian has non-finite entries") for m in issued)
    assert any(m.startswith("block 2's residual Jacobian has non-finite entries") for m in issued)
    assert any("non-finite from x^2 (block 1's output)" in m for m in issued)
    assert_every_nan_scalar_explained(res)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_residual_branch_is_named_and_counted(engine):
    res, issued = probe_warned(zero_branch_model(), prompt_ids(2, 5), engine=engine)
    assert res.zero_jacobians.tolist() == [[False, True, False]] * 2 and not res.nonfinite.any()
    assert (res.singular_values[:, 1] == 0).all()
    for k in res.ks:  # m_K is 0/0 in row 1; J_1 has no singular vectors for column 1
        for mats in (res.coupling[k], res.coupling_vju[k], res.alignment[k]):
            assert torch.isnan(mats[:, 1, :]).all() and torch.isnan(mats[:, :, 1]).all()
            assert torch.isfinite(mats[:, 0, 2]).all() and torch.isfinite(mats[:, 2, 0]).all()
    assert torch.isnan(res.stable_rank[:, 1]).all() and torch.isfinite(res.stable_rank[:, [0, 2]]).all()
    scalars = res.scalars()
    assert scalars["degenerate/zero_jacobians"] == 2.0 and scalars["nonfinite/jacobians"] == 0.0
    assert issued == res.meta["warnings"]
    assert any(
        m.startswith("block 1's residual Jacobian is exactly zero at 2 of 2 probed tokens (prompt 0 token 4")
        and "m_K is 0/0" in m
        for m in issued
    )
    assert any(m.startswith("block 1 leaves the hidden state unchanged (x^2 = x^1)") for m in issued)
    assert_every_nan_scalar_explained(res)


def test_randomized_and_exact_agree_on_where_metrics_are_nan():
    ids = prompt_ids(2, 5)
    for model in (nan_weight_model(), zero_branch_model()):
        exact, _ = probe_warned(model, ids, engine="exact")
        sketch, _ = probe_warned(model, ids, engine="randomized")
        assert torch.equal(exact.nonfinite, sketch.nonfinite)
        assert torch.equal(exact.zero_jacobians, sketch.zero_jacobians)
        for k in exact.ks:
            for name in ("coupling", "coupling_vju", "alignment"):
                assert torch.equal(getattr(exact, name)[k].isnan(), getattr(sketch, name)[k].isnan()), name
        assert exact.meta["warnings"] == sketch.meta["warnings"]


def test_one_probed_block_says_why_coupling_is_nan():
    with pytest.warns(DegenerateResultWarning, match=r"at least 2 probed blocks; layers=\[2\] probes one"):
        res = probe(tiny_model("gpt2"), prompt_ids(1, 5), layers=[-1])
    assert math.isnan(res.scalars()["coupling/k10"]) and math.isnan(res.scalars()["alignment_across/k10"])
    assert math.isfinite(res.scalars()["alignment/k10"])
    assert len(res.meta["warnings"]) == 1
    assert_every_nan_scalar_explained(res)


def test_overflowing_block_is_named():
    res, issued = probe_warned(overflow_model(), prompt_ids(2, 5), engine="exact")
    assert res.nonfinite[:, 1].all() and not res.nonfinite[:, 0].any()
    assert any(m.startswith("block 1's residual Jacobian has non-finite entries") for m in issued)
    assert_every_nan_scalar_explained(res)


def test_an_overflowing_unprobed_last_block_is_named():
    """The last block's output overflows; it is not probed, so no Jacobian is non-finite, yet the trajectory
    metrics are NaN: the message says where the hidden states stop being finite."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[2].attn.c_proj.bias.fill_(1e38)
        model.transformer.h[2].mlp.c_proj.bias.fill_(3e38)
    res, issued = probe_warned(model, prompt_ids(2, 5), layers=[0, 1], engine="exact")
    assert not res.nonfinite.any() and math.isnan(res.scalars()["lss/mean"])
    assert issued == [
        "the hidden states are non-finite from x^3 (block 2's output) on at 2 of 2 probed tokens (prompt 0 "
        "token 4, prompt 1 token 4), from overflow or NaN weights: lss, expodistance and "
        "linearization/cosine are NaN there"
    ]
    assert_every_nan_scalar_explained(res)


def test_a_healthy_probe_issues_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateResultWarning)
        res = probe(tiny_model("llama"), prompt_ids(2, 5))
    assert res.meta["warnings"] == []
    assert res.scalars()["degenerate/zero_jacobians"] == 0.0


def test_a_nan_without_a_known_cause_is_still_named():
    res, _ = probe_warned(tiny_model("gpt2"), prompt_ids(2, 5))
    res.lss[1] = float("nan")
    messages = explain(res)
    assert messages == [
        "lss/mean is NaN for a cause not identified here (a fit of a constant series, whose "
        "R^2 is 0/0, is one)"
    ]


def test_concat_restates_the_warnings_for_the_joined_tokens(tmp_path):
    ids = prompt_ids(1, 5)
    healthy, _ = probe_warned(tiny_model("gpt2"), ids)
    zero, _ = probe_warned(zero_branch_model(), ids)
    joined = ProbeResult.concat([healthy, zero])
    assert any(
        "exactly zero at 1 of 2 probed tokens (prompt 1 token 4)" in m for m in joined.meta["warnings"]
    )
    assert ProbeResult.load(joined.save(tmp_path / "r")).meta["warnings"] == joined.meta["warnings"]


@pytest.mark.parametrize(
    ("family", "overrides", "limit"),
    [("gpt2", {}, 64), ("llama", {"max_position_embeddings": 16}, 16), ("roberta", {}, 70), ("mpt", {}, 64)],
)
def test_prompt_longer_than_the_context_is_rejected_up_front(family, overrides, limit):
    model = tiny_model(family, **overrides)
    short = prompt_ids(1, 3, vocab=100)
    long = torch.cat([short, prompt_ids(1, limit + 1, vocab=100)[:, 2:]], 1)  # limit + 2 tokens
    message = f"prompt 1 has {limit + 2} tokens, more than the model's context of {limit} positions"
    with pytest.raises(ValueError, match=message + r".*max_length=" + str(limit)):
        probe(model, [short[0].tolist(), long[0].tolist()], engine="exact")
    if family == "gpt2":
        from alignscope.probing.probe import token_jacobians

        with pytest.raises(ValueError, match="more than the model's context of 64"):
            token_jacobians(model, long[0], pairs=[(0, 0)])


def test_prompt_at_the_context_length_is_probed():
    res = probe(tiny_model("roberta"), prompt_ids(1, 70, vocab=100), layers=[0, 1], engine="exact")
    assert res.tokens.tolist() == [[0, 69]]


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, "8", True])
@pytest.mark.parametrize("engine", ENGINES)
def test_chunk_size_must_be_a_positive_integer(chunk_size, engine):
    with pytest.raises(ValueError, match=rf"chunk_size must be a positive integer .*got {chunk_size!r}"):
        probe(tiny_model("gpt2"), prompt_ids(1, 5), chunk_size=chunk_size, engine=engine)


def test_huge_finite_jacobians_give_the_metrics_float64_gives():
    """Block 1's residual Jacobian reaches s_1 ~ 5e21 (finite in float32, its squares are not): stable rank
    and coupling are ratios and come out as in float64, not NaN."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e22)
        model.transformer.h[1].mlp.c_proj.bias.mul_(1e22)
    ids = prompt_ids(1, 5)
    f32, _ = probe_warned(model, ids, layers=[0, 1], engine="exact")
    f64, _ = probe_warned(model, ids, layers=[0, 1], engine="exact", dtype=torch.float64)
    assert float(f32.singular_values[0, 1, 0]) > 1e20 and not f32.nonfinite.any()
    assert torch.allclose(f32.stable_rank.double(), f64.stable_rank, rtol=1e-3)
    for k in f32.ks:
        assert torch.isfinite(f32.coupling[k]).all()
        assert torch.allclose(f32.coupling[k].double(), f64.coupling[k], atol=1e-3)

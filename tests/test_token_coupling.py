"""Coupling across tokens (token_coupling=True) and across context pairs (context_coupling), each against
an independent computation: Jacobians by autograd through the whole model's forward, m_K written out."""

from __future__ import annotations

import pytest
import torch

from alignscope import ProbeResult, context_coupling, probe
from conftest import prompt_ids, tiny_model, whole_model_jacobian


def naive_m(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """m_K(A, B) = || |U_{B,K}^T A V_{B,K}| - diag(s_{A,1..K}) ||_F / ||s_{A,1..K}||_2 by full SVDs."""
    a64, b64 = a.double(), b.double()
    s_a = torch.linalg.svdvals(a64)[:k]
    u_b, _, vh_b = torch.linalg.svd(b64)
    proj = u_b[:, :k].T @ a64 @ vh_b[:k].T
    return float(torch.linalg.matrix_norm(proj.abs() - torch.diag(s_a)) / torch.linalg.vector_norm(s_a))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_coupling_equals_an_independent_computation(family):
    model = tiny_model(family)
    ids = prompt_ids(1, 5, seed=7)
    res = probe(model, ids, tokens="all", ks=(3, 8), token_coupling=True, engine="single_token")
    assert res.token_coupling[3].shape == (1, 3, 5, 5)
    assert res.extras["token_coupling_positions"].tolist() == [[0, 1, 2, 3, 4]]
    eye = torch.eye(model.config.hidden_size)
    for layer in (0, 2):
        jac = [whole_model_jacobian(model, ids, layer, t, t) - eye for t in range(5)]
        for k in (3, 8):
            want = torch.tensor(
                [[naive_m(jac[t], jac[u], k) for u in range(5)] for t in range(5)], dtype=torch.float64
            )
            got = res.token_coupling[k][0, layer].double()
            assert torch.allclose(got, want, atol=2e-4), (layer, k, float((got - want).abs().max()))
    off = ~torch.eye(5, dtype=torch.bool)
    want = (1 - res.token_coupling[3][0] ** 2)[:, off].mean()
    assert res.scalars()["token_coupling/k3"] == pytest.approx(float(want), rel=1e-6)


def test_prompts_of_different_lengths_are_padded_and_join(tmp_path):
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    res = probe(model, ids, attention_mask=mask, tokens="all", ks=(4,), token_coupling=True)
    m = res.token_coupling[4]
    assert (
        m.shape == (2, 3, 5, 5)
        and torch.isnan(m[1, :, 3:, :]).all()
        and torch.isfinite(m[1, :, :3, :3]).all()
    )
    assert res.extras["token_coupling_positions"][1].tolist() == [0, 1, 2, -1, -1]
    alone = probe(model, ids[1:, :3], tokens="all", ks=(4,), token_coupling=True)
    assert torch.allclose(alone.token_coupling[4][0], m[1, :, :3, :3], atol=1e-6)
    joined = ProbeResult.concat([alone, probe(model, ids[:1], tokens="all", ks=(4,), token_coupling=True)])
    assert (
        joined.token_coupling[4].shape == (2, 3, 5, 5)
        and torch.isnan(joined.token_coupling[4][0, :, 4]).all()
    )
    loaded = ProbeResult.load(res.save(tmp_path / "r"))
    assert torch.equal(loaded.token_coupling[4].nan_to_num(), m.nan_to_num())
    assert probe(model, ids[:1], ks=(4,)).token_coupling is None


def test_token_coupling_needs_formed_jacobians():
    with pytest.raises(ValueError, match="token_coupling need an exact engine"):
        probe(tiny_model("llama"), prompt_ids(1, 4), tokens="all", engine="randomized", token_coupling=True)


@pytest.mark.parametrize("fixed", ["input", "output"])
def test_context_coupling_equals_an_independent_computation(fixed):
    model = tiny_model("llama")
    ids = prompt_ids(1, 5, seed=3)
    kwargs = {"t_in": 1} if fixed == "input" else {"t_out": 3}
    cc = context_coupling(model, ids, layers=[1], ks=(4,), **kwargs)
    pairs = [(1, t) for t in range(1, 5)] if fixed == "input" else [(t, 3) for t in range(4)]
    assert cc.pairs.tolist() == [list(p) for p in pairs] and cc.fixed == fixed and cc.layers == [1]
    eye = torch.eye(model.config.hidden_size)
    jac = [whole_model_jacobian(model, ids, 1, a, b) - (eye if a == b else 0) for a, b in pairs]
    n = len(pairs)
    want = torch.tensor(
        [[naive_m(jac[a], jac[b], 4) for b in range(n)] for a in range(n)], dtype=torch.float64
    )
    assert torch.allclose(cc.coupling[4][0].double(), want, atol=2e-4)
    with pytest.raises(ValueError, match="exactly one"):
        context_coupling(model, ids, t_in=1, t_out=2)


def test_token_grid_figure_shows_the_coupling_across_tokens(tmp_path):
    """The grid's data: 1 - m^2 of the first, middle and last probed block, diagonal masked, one colour
    scale, labelled colorbar, token ticks."""
    from alignscope.apps import plots

    res = probe(tiny_model("llama"), prompt_ids(1, 6, seed=2), tokens="all", ks=(4,), token_coupling=True)
    fig = plots.token_coupling_grid(res, 4, "tiny: tokens")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3  # blocks 0, 1, 2
    for i, image in enumerate(images):
        data = image.get_array()
        assert data.mask[range(6), range(6)].all() and not data.mask[0, 1]
        want = 1 - res.token_coupling[4][0, i].numpy() ** 2
        assert abs(float(data[0, 1]) - float(want[0, 1])) < 1e-6
    assert len({image.get_clim() for image in images}) == 1
    colorbar = [ax for ax in fig.axes if not ax.images and ax.get_ylabel()]
    assert any("1 - m_{4}^2" in ax.get_ylabel() for ax in colorbar)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3", "4", "5"]
    assert plots.save(fig, tmp_path / "grid.png").stat().st_size > 1000

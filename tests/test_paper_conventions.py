"""The paper's released-code conventions (conf/probe/paper_code.yaml) against an independent computation of
the released method, and the measures that come with them: left/left and right/right alignment, K as a
fraction of d, the p-norm and trace normalizations, the linearization and 1/s_1 fit ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from alignscope import ProbeSettings, probe
from alignscope.apps.config import config_dir
from alignscope.core.randomized import RandomizedSVD
from alignscope.probing.settings import ProbeSettingsError
from conftest import prompt_ids, tiny_model

PRESET = {
    k: v for k, v in yaml.safe_load((Path(config_dir()) / "probe" / "paper_code.yaml").read_text()).items()
}
PRESET.pop("defaults")


def released_jacobians(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The released pipeline: one forward with ``output_hidden_states``, block ``j`` as ``hidden_states[j]
    -> hidden_states[j+1]`` at the last token, its Jacobian by batched VJPs (identity rows), minus I."""
    with torch.enable_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        d = hs[0].shape[-1]
        eye = torch.eye(d)
        out = []
        for j in range(len(hs) - 1):
            y = hs[j + 1][0, -1]
            (rows,) = torch.autograd.grad(
                y, hs[j], grad_outputs=eye, retain_graph=True, is_grads_batched=True
            )
            out.append(rows[:, 0, -1].detach() - eye)
    return out, tuple(h.detach() for h in hs)


def released_coupling(jac: list[torch.Tensor], k: int, form: str, normalization: str, p: float = 2):
    """``m_K[i, j]`` as the released code computes it: full SVD, ``|| |U_j^T J_i V_j| - S_i ||_F`` over the
    trace or the p-norm of ``S_i``'s top K."""
    svds = [torch.linalg.svd(j) for j in jac]
    n = len(jac)
    out = torch.zeros(n, n)
    for i in range(n):
        s_i = torch.diag(svds[i].S[:k])
        for j in range(n):
            u, v = svds[j].U[:, :k], svds[j].Vh[:k, :].T
            m = u.T @ jac[i] @ v if form == "ujv" else v.T @ jac[i] @ u
            diff = torch.linalg.norm(m.abs() - s_i)
            out[i, j] = diff / (
                torch.trace(s_i) if normalization == "trace" else torch.norm(torch.diag(s_i), p=p)
            )
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_paper_code_preset_equals_the_released_method(family):
    """Every block's m_K (both forms) with the preset equals the released method, the last block included
    (it carries the final norm); without include_final_norm the last block differs."""
    model, ids = tiny_model(family), prompt_ids(1, 6)
    jac, _ = released_jacobians(model, ids)
    res = probe(model, ids, settings=ProbeSettings(**PRESET, engine="exact"))
    assert res.meta["include_final_norm"] and res.ks == [10, 30, 50]
    assert any("inv_s1_from" in w for w in res.meta["warnings"])  # 2 blocks, fit from block 10: said why
    for k in res.ks:
        for form, field in (("ujv", res.coupling), ("vju", res.coupling_vju)):
            expected = released_coupling(jac, min(k, jac[0].shape[0]), form, "norm")
            torch.testing.assert_close(field[k][0], expected, atol=2e-4, rtol=1e-3)
    trace = probe(model, ids, settings=ProbeSettings(**{**PRESET, "normalization": "trace"}, engine="exact"))
    torch.testing.assert_close(
        trace.coupling[10][0], released_coupling(jac, 10, "ujv", "trace"), atol=2e-4, rtol=1e-3
    )
    cubic = probe(model, ids, settings=ProbeSettings(**{**PRESET, "p": 3}, engine="single_token"))
    torch.testing.assert_close(
        cubic.coupling[10][0], released_coupling(jac, 10, "ujv", "norm", 3), atol=2e-4, rtol=1e-3
    )
    plain = probe(model, ids, ks=(10,), engine="exact")
    assert (plain.coupling[10][0, -1] - res.coupling[10][0, -1]).abs().max() > 1e-3  # the norm matters
    torch.testing.assert_close(plain.coupling[10][0, :-1, :-1], res.coupling[10][0, :-1, :-1])


def test_released_linearization_and_last_point():
    """linearization=drop_last: cosine between the normed output and the chain of the first L - 1 blocks;
    with include_final_norm the trajectory's last point is Hugging Face's last hidden state."""
    model, ids = tiny_model("llama"), prompt_ids(1, 6)
    jac, hs = released_jacobians(model, ids)
    res = probe(model, ids, settings=ProbeSettings(**PRESET, engine="exact"))
    torch.testing.assert_close(
        res.hidden_states[0], torch.stack([h[0, -1] for h in hs]), atol=1e-5, rtol=1e-5
    )
    z = hs[0][0, -1]
    for j in jac[:-1]:
        z = z + j @ z
    expected = torch.nn.functional.cosine_similarity(z, hs[-1][0, -1], dim=0)
    torch.testing.assert_close(res.linearization_cosine[0], expected, atol=1e-5, rtol=1e-5)
    every = probe(model, ids, ks=(4,), engine="exact", include_final_norm=True)
    assert abs(float(every.linearization_cosine[0] - expected)) > 1e-4


def test_inv_s1_fit_starts_at_the_given_block():
    model, ids = tiny_model("llama", num_hidden_layers=5), prompt_ids(1, 6)
    res = probe(model, ids, ks=(4,), engine="exact", inv_s1_from=3)
    inv = (1 / res.singular_values[0, 2:, 0]).double().numpy()
    slope = np.polyfit(np.arange(3, 6), inv, 1)[0]
    assert res.meta["inv_s1_from"] == 3
    assert float(res.inv_s1_slope[0]) == pytest.approx(slope, rel=1e-4)
    assert float(probe(model, ids, ks=(4,), engine="exact").inv_s1_slope[0]) != pytest.approx(slope, rel=1e-2)


def test_left_left_and_right_right_alignment_by_hand():
    model, ids = tiny_model("gpt2"), prompt_ids(1, 6)
    res = probe(model, ids, ks=(3, 8), engine="exact", keep_jacobians=True)
    U, _, Vh = torch.linalg.svd(res.jacobians[0].double())
    V = Vh.transpose(-2, -1)
    n = len(res.layers)
    for k in (3, 8):
        uu, vv = torch.zeros(n, n), torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                uu[i, j] = torch.linalg.norm((U[j, :, :k].T @ U[i, :, :k]).abs() - torch.eye(k)) / k**0.5
                vv[i, j] = torch.linalg.norm((V[j, :, :k].T @ V[i, :, :k]).abs() - torch.eye(k)) / k**0.5
        torch.testing.assert_close(res.alignment_uu[k][0], uu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(res.alignment_vv[k][0], vv, atol=1e-4, rtol=1e-4)
        off = ~torch.eye(n, dtype=torch.bool)
        assert res.scalars()[f"alignment_uu/k{k}"] == pytest.approx(float(uu[off].mean()), abs=1e-5)
        assert res.scalars()[f"alignment_vv/k{k}"] == pytest.approx(float(vv[off].mean()), abs=1e-5)
        assert not torch.allclose(res.alignment_uu[k][0], res.alignment[k][0], atol=1e-3)


def test_ks_as_fractions_of_d():
    s = ProbeSettings(ks=[0.05, 0.01, 0.5])
    assert s.ks == (0.01, 0.05, 0.5) and s.record()["ks"] == [0.01, 0.05, 0.5]
    assert s.ks_for(4096)[0] == [40, 204, 2048]  # int(q * d)
    assert s.ks_for(32)[0] == [1, 16]  # int(0.32) = 0 -> 1; int(1.6) = 1: the same K once
    assert ProbeSettings(ks=[10, 0.25]).ks_for(64)[0] == [10, 16]
    with pytest.raises(ProbeSettingsError, match="fractions"):
        s.ks_for(None)
    for bad in ([1.5], [0.0], [True], [-3]):
        with pytest.raises(ProbeSettingsError, match="ks must be"):
            ProbeSettings(ks=bad)
    res = probe(tiny_model("llama"), prompt_ids(1, 6), ks=[0.25], engine="exact")  # d = 32
    assert res.ks == [8] and res.meta["ks_requested"] == [0.25] and "coupling/k8" in res.scalars()


def test_new_settings_are_validated_and_recorded():
    for bad in ({"normalization": "frobenius"}, {"p": 0}, {"linearization": "first"}, {"inv_s1_from": 0}):
        with pytest.raises(ProbeSettingsError):
            ProbeSettings(**bad)
    fp = ProbeSettings(**PRESET).fingerprint()
    assert fp["include_final_norm"] is True and fp["linearization"] == "drop_last" and fp["inv_s1_from"] == 10
    assert ProbeSettings(**PRESET) != ProbeSettings() and ProbeSettings(p=2) == ProbeSettings()


def test_randomized_engine_takes_the_final_norm_and_refuses_other_normalizations():
    model, ids = tiny_model("llama"), prompt_ids(1, 6)
    exact = probe(model, ids, ks=(4,), engine="exact", include_final_norm=True, linearization="drop_last")
    full = RandomizedSVD(oversample=32)  # rank d: the sketch is exact, so any gap would be the final norm
    rand = probe(model, ids, ks=(4,), engine=full, include_final_norm=True, linearization="drop_last")
    torch.testing.assert_close(
        rand.singular_values[0, -1, :4], exact.singular_values[0, -1, :4], atol=1e-4, rtol=1e-3
    )
    torch.testing.assert_close(rand.coupling[4], exact.coupling[4], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rand.linearization_cosine, exact.linearization_cosine, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        probe(model, ids, ks=(4,), engine="randomized", normalization="trace")


def test_encoders_have_no_final_norm_to_include():
    model, ids = tiny_model("bert"), prompt_ids(1, 6)
    a = probe(model, ids, ks=(4,), engine="exact", include_final_norm=True)
    b = probe(model, ids, ks=(4,), engine="exact")
    assert torch.equal(a.coupling[4], b.coupling[4])

"""ProbeResult's repr (shapes and headline scalars, no tensor values) and its tidy pandas frames."""

from __future__ import annotations

import pytest
import torch

from alignscope import probe
from alignscope.core import metrics
from conftest import prompt_ids, tiny_model


@pytest.fixture(scope="module")
def result():
    model = tiny_model("llama", seed=0)
    return probe(model, prompt_ids(batch=2, length=6), tokens=[-2, -1], ks=(4, 8))


def test_repr_is_short_with_shapes_model_settings_and_scalars(result):
    text = repr(result)
    assert len(text.splitlines()) < 25 and "tensor(" not in text
    assert "LlamaForCausalLM" in text and "engine=" in text and "dtype=float32" in text
    assert "ks=[4, 8]" in text and "tokens=[-2, -1]" in text
    assert "[4, 3, 32]: singular_values" in text and "[4, 3, 3]: coupling{4, 8}" in text
    assert f"{result.scalars()['coupling/k4']: .4f}" in text and "lss/mean" in text


def test_block_frame_rows_are_token_and_block_values(result):
    df = result.to_frame()
    p, n = len(result.tokens), len(result.layers)
    assert len(df) == p * n
    assert list(df.columns[:6]) == ["prompt", "position", "block", "s1", "stable_rank", "nonfinite"]
    for row in (0, 3, len(df) - 1):
        t, b = divmod(row, n)
        r = df.iloc[row]
        assert (r.prompt, r.position) == tuple(result.tokens[t].tolist())
        assert r.block == result.layers[b]
        assert r.s1 == result.singular_values[t, b, 0].item()
        assert r.stable_rank == result.stable_rank[t, b].item()
        for k in result.ks:
            m = result.coupling[k][t]
            expect = sum(1 - m[b, j] ** 2 for j in range(n) if j != b) / (n - 1)
            assert r[f"coupling_k{k}"] == pytest.approx(expect.item(), abs=1e-6)
            assert r[f"alignment_k{k}"] == result.alignment[k][t, b, b].item()
    per_block = df.groupby("block")["coupling_k8"].mean().to_numpy()
    torch.testing.assert_close(
        torch.tensor(per_block), metrics.coupling_per_block(result.coupling[8]).mean(0), rtol=1e-5, atol=1e-6
    )


def test_token_frame_means_are_the_scalars(result):
    df = result.to_frame(level="token")
    assert len(df) == len(result.tokens)
    assert df["lss"].tolist() == result.lss.tolist()
    assert df["step_slope"].tolist() == result.step_slope.tolist()
    scalars = result.scalars()
    assert df["coupling_k4"].mean() == pytest.approx(scalars["coupling/k4"], rel=1e-5)
    assert df["alignment_k8"].mean() == pytest.approx(scalars["alignment/k8"], rel=1e-5)
    assert df["linearization_cosine"].mean() == pytest.approx(scalars["linearization/cosine"], rel=1e-5)
    joined = result.to_frame().merge(df, on=["prompt", "position"], suffixes=("", "_token"))
    assert len(joined) == len(result.tokens) * len(result.layers)
    with pytest.raises(ValueError, match="level must be"):
        result.to_frame(level="layer")

"""The randomized top-K engine: the range finder on matrices with known spectra, its products on
real blocks, and probe(engine="randomized") against the exact engines, errors within the stated estimate."""

from __future__ import annotations

import json

import pytest
import torch

from alignscope import ProbeResult, probe
from alignscope.autodiff.linearized import LinearizedBlock
from alignscope.core.randomized import RandomizedSVD, vector_angle_bounds
from alignscope.models import get_adapter
from alignscope.models.capture import capture_token_calls, probe_mode
from alignscope.probing.engines import select_engine
from alignscope.probing.engines.randomized import row_function
from alignscope.probing.plan import Plan, randomized_products
from conftest import TEXT_FAMILIES, prompt_ids, tiny_model


class MatrixOperator:
    """A known matrix behind the operator interface the range finder uses."""

    def __init__(self, J: torch.Tensor) -> None:
        self.J, self.d, self.x = J, J.shape[0], torch.zeros(J.shape[0], dtype=J.dtype)

    def jvp(self, rows):
        return rows @ self.J.T

    def vjp(self, rows):
        return rows @ self.J


def known_matrix(spectrum: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return U @ torch.diag(spectrum) @ V.T, U, V


@pytest.mark.parametrize("decay", [0.7, 0.97])
def test_range_finder_recovers_known_triplets_within_its_residuals(decay):
    d, k = 80, 6
    spectrum = decay ** torch.arange(d, dtype=torch.float64)
    J, U, V = known_matrix(spectrum)
    low = RandomizedSVD()(MatrixOperator(J), k)
    assert low.U.shape == (d, k + 10) and low.S.shape == (k + 10,) and low.residuals.shape == (k,)
    err = (low.S[:k] - spectrum[:k]).abs()
    assert (err <= low.residuals + 1e-12).all()
    if decay == 0.7:  # fast decay: the top triplets are essentially exact
        assert err.max() < 1e-8 and low.residuals.max() < 1e-6
        assert torch.allclose((low.U[:, :k] * U[:, :k]).sum(0).abs(), torch.ones(k, dtype=J.dtype), atol=1e-8)
    # the true angle of each right singular vector is within the Wedin bound
    coords = V.T @ low.V[:, :k]  # [d, k]: each approximate vector in the true basis
    sine = torch.stack([torch.cat([coords[:j, j], coords[j + 1 :, j]]).norm() for j in range(k)])
    angles = vector_angle_bounds(low.S, low.residuals, low.tail_fro)
    assert (sine <= angles + 1e-12).all()
    # the tail estimate: ||J - QQ^T J||_F^2 = ||J||_F^2 - ||S||^2 (Pythagoras), estimated from 8 probes
    true_tail = (spectrum.square().sum() - low.S.square().sum()).clamp_min(0).sqrt()
    assert 0.4 * true_tail <= low.tail_fro <= 2.5 * true_tail


def test_range_finder_settings_and_cost():
    with pytest.raises(ValueError, match="oversample"):
        RandomizedSVD(oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        RandomizedSVD(power_iters=1.5)
    assert RandomizedSVD(oversample=10, power_iters=2, probes=8).products(10, 768) == 20 * 6 + 10 + 8
    J, _, _ = known_matrix(0.9 ** torch.arange(12, dtype=torch.float64))
    low = RandomizedSVD(oversample=50)(MatrixOperator(J), 4)  # rank clipped to d: exact
    assert low.S.shape == (12,)
    assert torch.allclose(low.S, torch.linalg.svdvals(J), atol=1e-12)
    same = RandomizedSVD(oversample=3)(MatrixOperator(J), 4)
    again = RandomizedSVD(oversample=3)(MatrixOperator(J), 4)
    assert torch.equal(same.S, again.S)  # seeded


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linearized_block_products_match_the_jacobian(family):
    model = tiny_model(family)
    ids = prompt_ids(1, 6)
    J = probe(model, ids, layers=[1], keep_jacobians=True, engine="exact").jacobians[0, 0]  # residual
    adapter = get_adapter(model)
    with probe_mode(model):
        blocks = adapter.blocks(model)
        calls = capture_token_calls(model, adapter, blocks, ids, 5)
        fn, x = row_function(blocks[1], calls[1], adapter, torch.float32, None)
        rows = torch.randn(7, J.shape[0], generator=torch.Generator().manual_seed(0))
        op = LinearizedBlock(fn, x, chunk_size=3)
        assert torch.allclose(op.jvp(rows), rows @ J.T, atol=1e-5)
        assert torch.allclose(op.vjp(rows), rows @ J, atol=1e-5)
        forward_mode = LinearizedBlock(fn, x)
        forward_mode._forward_mode = True  # the fallback path: torch.func.jvp under vmap
        assert torch.allclose(forward_mode.jvp(rows), rows @ J.T, atol=1e-5)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_full_rank_sketch_reproduces_the_exact_probe(family):
    model = tiny_model(family)
    ids = prompt_ids(2, 7, seed=3)
    exact = probe(model, ids, ks=(4, 8), engine="exact")
    d = exact.hidden_states.shape[-1]
    rand = probe(model, ids, ks=(4, 8), engine=RandomizedSVD(oversample=d, power_iters=1))
    assert rand.meta["engine"] == "randomized" and rand.meta["randomized"]["rank"] == d
    for k in (4, 8):
        assert torch.allclose(rand.coupling[k], exact.coupling[k], atol=1e-4)
        assert torch.allclose(rand.coupling_vju[k], exact.coupling_vju[k], atol=1e-4)
        assert torch.allclose(rand.alignment[k], exact.alignment[k], atol=1e-3)
        assert rand.extras[f"coupling_error_k{k}"].shape == exact.coupling[k].shape
    scale = float(exact.singular_values.max())  # float32 rounding is relative to s_1 (about 1e3 for gemma2)
    assert torch.allclose(rand.singular_values, exact.singular_values, atol=1e-5 * scale)
    assert torch.allclose(rand.stable_rank, exact.stable_rank, rtol=1e-4)
    assert torch.allclose(rand.linearization_cosine, exact.linearization_cosine, atol=1e-4)
    h_scale = float(exact.hidden_states.abs().max())  # single-token capture vs full sequence: rounding
    assert torch.allclose(rand.hidden_states, exact.hidden_states, atol=1e-6 * h_scale)
    assert rand.extras["triplet_residuals"].max() < 1e-4 * scale


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_default_sketch_errors_are_within_the_stated_estimate(family):
    model = tiny_model(family, seed=2)
    ids = prompt_ids(2, 9, seed=5)
    exact = probe(model, ids, ks=(3, 6), engine="single_token")
    rand = probe(model, ids, ks=(3, 6), engine="randomized")
    assert rand.singular_values.shape[-1] == 16  # Kmax + oversample
    s_err = (rand.singular_values[..., :6] - exact.singular_values[..., :6]).abs()
    assert (s_err <= rand.extras["triplet_residuals"] + 1e-5).all()
    for k in (3, 6):
        err = (rand.coupling[k] - exact.coupling[k]).abs()
        assert (err <= rand.extras[f"coupling_error_k{k}"] + 1e-5).all()
        assert err.max() < 0.1  # random-init tiny blocks: flat spectra, the hard case


def chosen(causal, d, ks, blocks, device="cpu", plan=None):
    """The engine name ``engine="auto"`` selects."""
    return select_engine("auto", plan or Plan(), None, causal, d, max(ks), blocks, device).name


def test_engine_choice_and_errors(tmp_path):
    assert chosen(True, 4096, [10], 32) == "randomized"
    assert chosen(True, 576, [10, 30, 50], 30) == "single_token"
    assert chosen(False, 576, [10], 30) == "exact"
    assert chosen(True, None, [10], 30) == "single_token"
    # measured crossovers (docs/benchmarks.md): d / 2 products below d = 1024 on CPUs, d from there on
    assert randomized_products(RandomizedSVD(), 50, 1024, 6) == 1018
    assert chosen(True, 1024, [10, 30, 50], 6) == "randomized"
    assert chosen(True, 1024, [10, 30, 50], 7) == "single_token"  # 1118 products
    assert chosen(True, 1024, [10, 30, 50], 6, "cuda") == "single_token"
    assert chosen(True, 2048, [10, 30, 50], 16) == "randomized"  # 2018 products
    assert chosen(True, 2048, [10, 30, 50], 5, "cuda") == "randomized"  # 918
    assert chosen(True, 576, [10], 7) == "randomized"  # 278 <= 288
    assert chosen(True, 576, [10], 8) == "single_token"  # 298
    assert Plan().auto_product_budget(1023) == 511.5 and Plan().auto_product_budget(1024) == 1024
    assert Plan().auto_product_budget(4096, torch.device("cuda")) == 2048
    assert chosen(True, 576, [10], 8, plan=Plan(auto_share_cpu=1.0)) == "randomized"  # the plan's rule
    model, ids = tiny_model("llama"), prompt_ids(1, 5)
    with pytest.raises(ValueError, match="keep_jacobians"):
        probe(model, ids, engine="randomized", keep_jacobians=True)
    with pytest.raises(ValueError, match="unknown engine"):
        probe(model, ids, engine="randomised")
    result = probe(model, ids, ks=(2,), engine="randomized", layers=[0, 2])
    assert result.linearization_cosine is None  # needs every block
    loaded = ProbeResult.load(result.save(tmp_path / "r"))
    assert loaded.meta["randomized"]["power_iters"] == 2
    assert torch.equal(loaded.extras["coupling_error_k2"], result.extras["coupling_error_k2"])


def test_probe_app_and_monitor_take_the_randomized_engine(tmp_path):
    from hydra import compose, initialize_config_dir

    from alignscope.apps.callback import AlignmentMonitor, MonitorConfigError
    from alignscope.apps.config import config_dir
    from alignscope.apps.probe_app import run
    from conftest import save_tiny_local_model

    local = save_tiny_local_model(tmp_path / "model")
    overrides = [
        f"paths.run_dir={tmp_path / 'run'}",
        "logger=none",
        "model=local",
        f"model.path={local}",
        "prompts.num=2",
        "probe.ks=[3]",
        "+probe.engine._target_=alignscope.core.randomized.RandomizedSVD",
        "+probe.engine.power_iters=1",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("probe_app", overrides=[*overrides[:6], "probe.engine=null", *overrides[6:]])
    run(cfg)
    result = ProbeResult.load(tmp_path / "run" / "result")
    assert result.meta["engine"] == "randomized" and result.meta["randomized"]["power_iters"] == 1
    assert "block_jacobians" not in result.extras and "coupling_error_k3" in result.extras
    AlignmentMonitor(engine="randomized")
    AlignmentMonitor(engine=RandomizedSVD(oversample=4))
    with pytest.raises(MonitorConfigError, match="engine"):
        AlignmentMonitor(engine="fastest")


def test_gpu_check_script_runs_its_smoke_version():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--sweep", "--tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for engine in ("single_token", "randomized", "exact"):
        assert f"{engine}: 3 blocks" in out.stdout
    assert "T=16 copies, 256 per pass" in out.stdout and "factorization.top_svd" in out.stdout
    assert "agreement on 3 blocks" in out.stdout
    import re

    released = re.findall(r"released pipeline vs probe\(\), T = (\d+).*max \|d m_K\| (\S+)", out.stdout)
    assert [t for t, _ in released] == ["8", "16"] and all(float(d) < 1e-5 for _, d in released), released


def test_randomized_engine_on_a_bfloat16_model_matches_the_exact_engine():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = prompt_ids(1, 6)
    exact = probe(model, ids, ks=(4,), engine="single_token")
    rand = probe(model, ids, ks=(4,), engine=RandomizedSVD(oversample=64))
    assert rand.singular_values.dtype == torch.float32
    assert torch.allclose(rand.singular_values, exact.singular_values, atol=1e-4)
    assert torch.allclose(rand.coupling[4], exact.coupling[4], atol=1e-3)


def test_training_app_monitors_with_the_randomized_engine(tmp_path):
    from hydra import compose, initialize_config_dir

    from alignscope.apps.config import config_dir
    from alignscope.apps.train import train

    run = tmp_path / "run"
    overrides = [
        "experiment=smoke",
        f"paths.run_dir={run}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "logger=csv",
        "trainer.max_steps=2",
        "probe.engine=randomized",
        "probe.ks=[4]",
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        train(compose("train", overrides=overrides))
    lines = [json.loads(x) for x in (run / "probes.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and len(lines) >= 2
    assert all(0 <= x["coupling/k4"] <= 1 for x in lines)
    first = ProbeResult.load(run / "probes" / "step_0000000")
    assert first.meta["engine"] == "randomized" and "coupling_error_k4" in first.extras


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo"])
def test_randomized_products_for_long_contexts(family, copies, monkeypatch):
    """At long contexts the sketch's products run batched (CPUs) or, from ``Plan.sketch_copies_min_context`` cached
    tokens on, on copies of the token (CUDA's plan, forced here; GPT-Neo cannot take copies and keeps the
    batched products); a full-rank sketch equals the exact probe either way."""
    from alignscope.probing.engines import randomized as randomized_engine

    copies_fn, on_copies = randomized_engine.token_copies_function, []
    monkeypatch.setattr(
        randomized_engine, "token_copies_function", lambda *a: on_copies.append(a) or copies_fn(*a)
    )
    plan = Plan(copies_devices=("cpu",) if copies else ())  # CUDA's plan forced onto the CPU, or none

    overrides = {
        "gpt2": {"n_positions": 512},
        "gpt_neo": {"max_position_embeddings": 512},
        "llama": {"max_position_embeddings": 512},
    }
    model = tiny_model(family, **overrides.get(family, {}))
    ids = prompt_ids(1, plan.sketch_copies_min_context + 3, seed=8)
    exact = probe(model, ids, ks=(4,), engine="exact")
    rand = probe(model, ids, ks=(4,), engine=RandomizedSVD(oversample=64, power_iters=1), plan=plan)
    scale = float(exact.singular_values.max())
    assert torch.allclose(rand.singular_values, exact.singular_values, atol=1e-5 * scale)
    assert torch.allclose(rand.coupling[4], exact.coupling[4], atol=1e-4)
    assert torch.allclose(rand.coupling_vju[4], exact.coupling_vju[4], atol=1e-4)
    assert torch.allclose(rand.linearization_cosine, exact.linearization_cosine, atol=1e-4)
    assert bool(on_copies) == copies  # copies were tried exactly when the plan said so (GPT-Neo: refused)

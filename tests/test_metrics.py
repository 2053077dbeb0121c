"""Metrics against hand-built matrices and trajectories with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from alignscope.core import factorization, metrics


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def matrix_with(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return U @ torch.diag(s) @ V.T


def test_svd_reconstructs_and_sorts():
    J = torch.randn(3, 6, 6, dtype=torch.float64)
    U, S, V = factorization.svd(J)
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(-2, -1), J, atol=1e-12)
    assert (S[..., :-1] >= S[..., 1:]).all()


def test_svd_nonfinite_gives_nan_not_error():
    J = torch.randn(2, 4, 4)
    J[1, 0, 0] = float("inf")
    U, S, _V = factorization.svd(J)
    assert torch.isfinite(S[0]).all() and torch.isnan(S[1]).all() and torch.isnan(U[1]).all()


def test_coupling_of_a_matrix_with_itself_is_zero():
    J = torch.randn(1, 8, 8, dtype=torch.float64).repeat(2, 1, 1)
    m = metrics.coupling_matrix(J, 5)
    assert torch.allclose(m, torch.zeros(2, 2, dtype=torch.float64), atol=1e-12)
    assert metrics.coupling_summary(m) == pytest.approx(1.0)


def test_coupling_invariant_under_singular_vector_sign_flips():
    d, k = 7, 4
    U, V = random_orthogonal(d, 0), random_orthogonal(d, 1)
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    J = torch.stack([matrix_with(U, s, V), torch.randn(d, d, dtype=torch.float64)])
    factors = factorization.svd(J)
    flip = torch.tensor([1, -1, 1, -1, -1, 1, 1], dtype=torch.float64)
    flipped = factorization.SVD(factors.U * flip, factors.S, factors.V * flip)  # u_k, v_k flipped together
    a = metrics.coupling_matrix(J, k, factors=factors)
    b = metrics.coupling_matrix(J, k, factors=flipped)
    assert torch.allclose(a, b, atol=1e-12)
    assert a[0, 1] > 0.05  # not trivially zero


def test_coupling_known_case_by_hand():
    # J_j = diag(2, 1) (U = V = I); J_i = [[1, 1], [0, 1]] with known singular values.
    J_j = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    J_i = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    # s(J_i) = golden ratio and its inverse: sqrt((3 +- sqrt(5)) / 2)
    phi = (1 + math.sqrt(5)) / 2
    s1, s2 = phi, 1 / phi
    # K = 1: |e1^T J_i e1| = 1; m = |1 - s1| / s1
    m = metrics.coupling_matrix(torch.stack([J_i, J_j]), 1)
    assert m[0, 1] == pytest.approx(abs(1 - s1) / s1, abs=1e-12)
    # K = 2: |J_i| - diag(s1, s2) = [[1 - s1, 1], [0, 1 - s2]]
    m2 = metrics.coupling_matrix(torch.stack([J_i, J_j]), 2)
    expect = math.sqrt((1 - s1) ** 2 + 1 + (1 - s2) ** 2) / math.sqrt(s1**2 + s2**2)
    assert m2[0, 1] == pytest.approx(expect, abs=1e-12)
    # reverse pair: J_j projected on J_i's bases
    Ui, _Si, Vi = factorization.svd(J_i[None])
    proj = (Ui[0, :, :1].T @ J_j @ Vi[0, :, :1]).abs()
    assert m[1, 0] == pytest.approx(float(abs(proj[0, 0] - 2.0) / 2.0), abs=1e-12)


def test_coupling_vju_form_by_hand():
    d = 5
    U, V = random_orthogonal(d, 2), random_orthogonal(d, 3)
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    Ji, Jj = torch.randn(d, d, dtype=torch.float64), matrix_with(U, s, V)
    k = 3
    Uj, _, Vj = factorization.svd(Jj[None])
    si = torch.linalg.svdvals(Ji)[:k]
    expect = torch.linalg.norm(
        (Vj[0, :, :k].T @ Ji @ Uj[0, :, :k]).abs() - torch.diag(si)
    ) / torch.linalg.norm(si)
    m = metrics.coupling_matrix(torch.stack([Ji, Jj]), k, form="vju")
    assert m[0, 1] == pytest.approx(float(expect), abs=1e-12)


def test_unrelated_bases_give_coupling_near_one():
    d, k = 200, 5
    Js = torch.stack(
        [
            matrix_with(
                random_orthogonal(d, i),
                torch.linspace(2, 0.1, d, dtype=torch.float64),
                random_orthogonal(d, 10 + i),
            )
            for i in range(2)
        ]
    )
    m = metrics.coupling_matrix(Js, k)
    assert 0.9 < float(m[0, 1]) < 1.1


def test_coupling_k_is_clipped_to_d():
    J = torch.randn(2, 3, 3, dtype=torch.float64)
    assert torch.allclose(metrics.coupling_matrix(J, 50), metrics.coupling_matrix(J, 3))
    with pytest.raises(ValueError, match="positive integer"):
        metrics.coupling_matrix(J, 0)


def test_alignment_symmetric_psd_is_zero_and_rotation_known():
    A = torch.randn(6, 6, dtype=torch.float64)
    sym = A @ A.T + torch.eye(6, dtype=torch.float64)  # U = V
    U, _S, V = factorization.svd(sym[None])
    assert metrics.alignment_matrix(U, V, 3)[0, 0] == pytest.approx(0.0, abs=1e-10)
    # A 90-degree rotation in each of 3 planes: J = R, U = R, V = I up to signs: |U^T V| is a permutation
    # with zeros on the diagonal -> ||P - I||_F^2 = 2K -> a = sqrt(2)
    R = torch.zeros(6, 6, dtype=torch.float64)
    for p in range(3):
        R[2 * p, 2 * p + 1], R[2 * p + 1, 2 * p] = -1.0, 1.0
    U, _S, V = factorization.svd(R[None])
    a = metrics.alignment_matrix(U, V, 6)[0, 0]
    assert a == pytest.approx(math.sqrt(2.0), abs=1e-10)


def test_alignment_across_blocks_uses_uj_and_vi():
    U = torch.stack([random_orthogonal(4, 0), random_orthogonal(4, 1)])
    V = torch.stack([random_orthogonal(4, 2), random_orthogonal(4, 3)])
    k = 2
    expect = torch.linalg.norm(
        (U[1, :, :k].T @ V[0, :, :k]).abs() - torch.eye(k, dtype=torch.float64)
    ) / math.sqrt(k)
    assert metrics.alignment_matrix(U, V, k)[0, 1] == pytest.approx(float(expect), abs=1e-12)


def test_line_shape_score_straight_line_is_one():
    direction = torch.randn(5, dtype=torch.float64)
    steps = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)[:, None] * direction
    traj = torch.cat([torch.randn(1, 5, dtype=torch.float64), steps]).cumsum(0)
    assert float(metrics.line_shape_score(traj)) == pytest.approx(1.0, abs=1e-12)


def test_line_shape_score_zigzag_by_hand():
    # steps e1, 2 e2, 3 e1, 4 e2 -> unit steps sum to (2, 2): LSS = 4 / (2 sqrt 2) = sqrt 2
    steps = torch.tensor([[1.0, 0], [0, 2.0], [3.0, 0], [0, 4.0]], dtype=torch.float64)
    traj = torch.cat([torch.zeros(1, 2, dtype=torch.float64), steps]).cumsum(0)
    assert float(metrics.line_shape_score(traj)) == pytest.approx(math.sqrt(2), abs=1e-12)
    # back and forth: unit steps cancel -> infinite score
    back = torch.tensor([[0.0, 0], [1.0, 0], [0.0, 0]], dtype=torch.float64)
    assert math.isinf(float(metrics.line_shape_score(back)))


def test_line_shape_score_zero_step_is_nan():
    traj = torch.tensor([[0.0, 0], [1.0, 0], [1.0, 0]], dtype=torch.float64)
    assert math.isnan(float(metrics.line_shape_score(traj)))


def test_expodistance_exact_on_geometric_steps():
    rate = 1.3
    steps = torch.tensor([rate**l for l in range(1, 9)], dtype=torch.float64)[:, None] * torch.tensor(
        [[1.0, 0.0]]
    )
    traj = torch.cat([torch.tensor([[1.0, 0.0]], dtype=torch.float64), steps]).cumsum(0)
    fit = metrics.expodistance(traj)
    assert float(fit.step_slope) == pytest.approx(math.log(rate), abs=1e-12)
    assert float(fit.step_r2) == pytest.approx(1.0, abs=1e-12)
    # norms: ||x^l|| = 1 + sum_{i<=l} rate^i, checked against a direct least-squares fit
    norms = traj.norm(dim=-1).log()
    A = torch.stack([torch.arange(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)], 1)
    slope = torch.linalg.lstsq(A, norms[:, None]).solution[0, 0]
    assert float(fit.norm_slope) == pytest.approx(float(slope), abs=1e-10)
    assert 0.9 < float(fit.norm_r2) <= 1.0


def test_linear_fit_degenerate_is_nan():
    fit = metrics.linear_fit(torch.arange(4.0), torch.ones(4))
    assert float(fit.slope) == 0.0 and math.isnan(float(fit.r2))
    assert math.isnan(float(metrics.linear_fit(torch.ones(1), torch.ones(1)).slope))


def test_stable_rank_of_known_matrix():
    s = torch.tensor([[3.0, 2.0, 1.0]])
    assert float(metrics.stable_rank(s)[0]) == pytest.approx((9 + 4 + 1) / 9)
    J = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert float(metrics.stable_rank(factorization.svd(J).S)) == pytest.approx(14 / 9, rel=1e-6)


def test_inverse_top_singular_fit_exact():
    depth = torch.arange(1, 6)
    s1 = 1 / (0.5 * depth + 2.0)
    fit = metrics.inverse_top_singular_fit(s1.double())
    assert float(fit.slope) == pytest.approx(0.5) and float(fit.r2) == pytest.approx(1.0)


def test_linearization_cosine_exact_for_linear_blocks():
    L, d = 4, 5
    Js = torch.randn(L, d, d, dtype=torch.float64) * 0.3
    x0 = torch.randn(d, dtype=torch.float64)
    x = x0
    for J in Js:  # linear blocks x^l = x^{l-1} + J x^{l-1}
        x = x + J @ x
    assert float(metrics.linearization_cosine(Js, x0, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(metrics.linearization_cosine(Js, x0, -x)) == pytest.approx(-1.0, abs=1e-12)


def test_trajectory_pca_recovers_a_plane():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64))[0]
    coords = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    pts, ratio = metrics.trajectory_pca(coords @ basis.T)
    assert pts.shape == (3, 5, 2)
    assert float(ratio.sum()) == pytest.approx(1.0, abs=1e-10)


def test_coupling_matrices_match_a_naive_double_loop():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(4, 9, 9, generator=g, dtype=torch.float64)
    many = metrics.coupling_matrices(J, [2, 5, 20], "ujv")
    many_vju = metrics.coupling_matrices(J, [2, 5, 20], "vju")
    for k in (2, 5, 20):
        kc = min(k, 9)
        for i in range(4):
            for j in range(4):
                Uj, _, Vhj = torch.linalg.svd(J[j])
                si = torch.linalg.svdvals(J[i])[:kc]
                ujv = (Uj[:, :kc].T @ J[i] @ Vhj.T[:, :kc]).abs() - torch.diag(si)
                vju = (Vhj.T[:, :kc].T @ J[i] @ Uj[:, :kc]).abs() - torch.diag(si)
                assert float(many[k][i, j]) == pytest.approx(
                    float(torch.linalg.norm(ujv) / torch.linalg.norm(si)), abs=1e-12
                )
                assert float(many_vju[k][i, j]) == pytest.approx(
                    float(torch.linalg.norm(vju) / torch.linalg.norm(si)), abs=1e-12
                )


def test_top_svd_gram_matches_known_spectrum():
    """Singular values spanning 6 decades (float32 matrix): the Gram route in float64 recovers every one
    to the float32 matrix's own accuracy, and its top vectors are the true ones up to sign."""
    d, k = 48, 10
    U0, V0 = random_orthogonal(d, 1), random_orthogonal(d, 2)
    s0 = torch.logspace(0.5, -5.5, d, dtype=torch.float64)
    J = matrix_with(U0, s0, V0).float()
    exact = torch.linalg.svdvals(J.double())  # of the float32-rounded matrix
    U, S, V = factorization.top_svd(J, k, method="gram")
    assert U.shape == (d, k) and V.shape == (d, k) and S.shape == (d,) and S.dtype == torch.float32
    assert torch.allclose(S.double(), exact, rtol=0, atol=1e-6 * float(exact[0]))
    assert torch.allclose(
        (U0[:, :k].T @ U.double()).diagonal().abs(), torch.ones(k, dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(
        (V0[:, :k].T @ V.double()).diagonal().abs(), torch.ones(k, dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(J.double() @ V.double(), U.double() * S[:k].double(), atol=1e-5)  # J v_k = s_k u_k


def test_top_svd_methods_agree_and_feed_the_metrics():
    J = torch.eye(32) + 0.3 * torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(3))
    svd_f, gram_f = factorization.top_svd(J, 8, method="svd"), factorization.top_svd(J, 8, method="gram")
    assert torch.allclose(gram_f.S, svd_f.S, rtol=1e-5)
    for name in ("U", "V"):
        overlap = torch.einsum("lak,lak->lk", getattr(gram_f, name), getattr(svd_f, name)).abs()
        assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-4)
    full = factorization.svd(J)
    for form in ("ujv", "vju"):
        want = metrics.coupling_matrices(J, [3, 8], form, full)
        got = metrics.coupling_matrices(J, [3, 8], form, gram_f)
        assert all(torch.allclose(got[k], want[k], atol=1e-4) for k in (3, 8))
    want, got = (
        metrics.alignment_matrices(full.U, full.V, [8]),
        metrics.alignment_matrices(gram_f.U, gram_f.V, [8]),
    )
    assert torch.allclose(got[8], want[8], atol=1e-4)


@pytest.mark.parametrize("method", ["gram", "lapack"])
def test_top_svd_rank_deficient_and_nonfinite(method):
    """A rank-2 matrix asked for K = 5 takes the full SVD (gram: U_K is not J V_K / S_K there; lapack: inverse
    iteration cannot separate zero singular values); a zero matrix has zero singular values and NaN
    (undefined) vectors; a non-finite matrix gives NaN factors."""
    from alignscope.core import lapack_svd

    if method == "lapack" and not lapack_svd.available():
        pytest.skip("this SciPy lacks the LAPACK routines")
    a, b = torch.randn(2, 16, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    J = torch.stack(
        [a @ a.T + b @ b.T, torch.zeros(16, 16, dtype=torch.float64), torch.eye(16, dtype=torch.float64)]
    )
    J[2, 0, 0] = float("nan")
    U, S, V = factorization.top_svd(J, 5, method=method)
    want = factorization.top_svd(J[:2], 5, method="svd")
    assert torch.allclose(S[:2], want.S, atol=1e-12)
    assert torch.allclose(U[0] @ torch.diag(S[0, :5]) @ V[0].T, J[0], atol=1e-10)  # rank 2: top-5 rebuilds J
    assert torch.isfinite(U[0]).all() and torch.isnan(U[1]).all() and torch.isnan(V[1]).all()
    assert torch.isnan(S[2]).all() and torch.isnan(U[2]).all()


def test_top_svd_rejects_unknown_method():
    with pytest.raises(ValueError, match="method must be"):
        factorization.top_svd(torch.eye(3), 2, method="qr")


def test_top_svd_gram_in_groups_equals_one_batch(monkeypatch):
    """Large batches go through the Gram route in groups (bounded float64 temporaries): same factors."""
    J = torch.eye(12) + 0.5 * torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    J[1, 2, 0, 0] = float("inf")
    whole = factorization.top_svd(J, 4, method="gram")
    monkeypatch.setattr(factorization, "GRAM_GROUP_VALUES", 2 * 12 * 12)  # groups of two matrices
    grouped = factorization.top_svd(J, 4, method="gram")
    assert grouped.U.shape == (2, 3, 12, 4) and grouped.S.shape == (2, 3, 12)
    for a, b in zip(grouped, whole, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-6)
    assert torch.isnan(grouped.S[1, 2]).all() and torch.isfinite(grouped.S[0]).all()


def test_svd_in_threads_matches_one_call_and_restores_the_thread_count(monkeypatch):
    """On CPUs factorization.svd splits a batch among threads of one intra-op thread each: the same factors as
    torch.linalg.svd of the whole batch, any batch shape, and torch's thread count as before."""
    import threading

    from alignscope.core import factorization

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    seen: list[tuple[str, int]] = []
    svd = torch.linalg.svd
    both = threading.Barrier(2, timeout=30)  # passes only if the two parts run at the same time

    def watched(a, *args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        both.wait()
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        U, S, V = factorization.svd(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2 and all(n == 1 for _, n in seen)  # two parts, one intra-op thread each
    assert len({name for name, _ in seen}) == 2  # in two threads at once
    S0 = torch.linalg.svdvals(x)
    assert U.shape == (2, 3, 6, 6) and S.shape == (2, 3, 6)
    assert torch.allclose(S, S0)
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(-2, -1), x)

"""Property-based tests of alignscope.core.metrics: random shapes, ranks, scales and non-finite entries, checked
against independent computations (torch.linalg directly) and invariants (ranges, orthogonal changes of
basis, NaN exactly where the input cannot define a value)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignscope.core import factorization, metrics

FAST = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread (factorization.svd's thread pool would cost more than the SVDs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


seeds = st.integers(0, 2**31 - 1)
widths = st.integers(2, 9)


def gaussian(seed: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthogonal(seed: int, d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(gaussian(seed, d, d))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(seed: int, s: torch.Tensor) -> torch.Tensor:
    """``U diag(s) V^T`` with random orthogonal ``U``, ``V``."""
    d = s.shape[0]
    return orthogonal(seed, d) @ torch.diag(s) @ orthogonal(seed + 1, d).T


def separated_spectrum(seed: int, d: int) -> torch.Tensor:
    """``d`` descending singular values with relative gaps of at least 10% (unique singular vectors)."""
    steps = 0.1 + gaussian(seed, d).abs()
    return steps.flip(0).cumsum(0).flip(0)


@st.composite
def jacobian_stacks(draw, kinds=("gauss", "low_rank", "zero", "nan", "inf"), n=None):
    """``[n, d, d]`` float64 matrices of assorted kinds (Gaussian at a random scale, exactly low rank, zero,
    one NaN or +-inf entry) and the kind of each."""
    d = draw(widths)
    n = draw(st.integers(1, 4)) if n is None else n
    seed = draw(seeds)
    picked = [draw(st.sampled_from(kinds)) for _ in range(n)]
    out = []
    for i, kind in enumerate(picked):
        scale = 10.0 ** draw(st.integers(-3, 3))
        J = gaussian(seed + i, d, d) * scale
        if kind == "low_rank":
            r = draw(st.integers(1, d - 1))
            J = (gaussian(seed + i, d, r) @ gaussian(seed + 100 + i, r, d)) * scale
        elif kind == "zero":
            J = torch.zeros(d, d, dtype=torch.float64)
        elif kind in ("nan", "inf"):
            a, b = draw(st.integers(0, d - 1)), draw(st.integers(0, d - 1))
            J[a, b] = float("nan") if kind == "nan" else draw(st.sampled_from([math.inf, -math.inf]))
        out.append(J)
    return torch.stack(out), picked


def reference_coupling(J: torch.Tensor, k: int, form: str) -> torch.Tensor:
    """``m_K`` by a double loop over torch.linalg.svd of each matrix (finite, nonzero matrices only)."""
    n, d = J.shape[0], J.shape[-1]
    k = min(k, d)
    out = torch.empty(n, n, dtype=J.dtype)
    for i in range(n):
        s_i = torch.linalg.svdvals(J[i])[:k]
        for j in range(n):
            U, _, Vh = torch.linalg.svd(J[j])
            A, B = (U[:, :k], Vh.T[:, :k]) if form == "ujv" else (Vh.T[:, :k], U[:, :k])
            out[i, j] = torch.linalg.matrix_norm((A.T @ J[i] @ B).abs() - torch.diag(s_i)) / s_i.norm()
    return out


# --- factorizations ---------------------------------------------------------------------------------


@FAST
@given(jacobian_stacks(), st.sampled_from(["svd", "gram", "lapack"]), st.integers(1, 12))
def test_factors_are_defined_exactly_where_the_matrix_allows(stack, method, k):
    J, kinds = stack
    U, S, V = factorization.top_svd(J, k, method)
    kk = min(k, J.shape[-1])
    assert U.shape == (*J.shape[:-1], kk) and S.shape == J.shape[:-1]
    for i, kind in enumerate(kinds):
        if kind in ("nan", "inf"):
            assert torch.isnan(S[i]).all() and torch.isnan(U[i]).all() and torch.isnan(V[i]).all()
            continue
        want = torch.linalg.svdvals(J[i])
        accuracy = 1e-7 if method == "gram" else 1e-10  # the Gram route: about 1e-8 s_1 (its docstring)
        assert torch.allclose(S[i], want, rtol=0, atol=accuracy * max(float(want[0]), 1e-300))
        if kind == "zero":  # every orthonormal basis fits a zero matrix: no vectors
            assert (S[i] == 0).all() and torch.isnan(U[i]).all() and torch.isnan(V[i]).all()
            continue
        eye = torch.eye(kk, dtype=J.dtype)
        assert torch.allclose(U[i].T @ U[i], eye, atol=1e-8) and torch.allclose(V[i].T @ V[i], eye, atol=1e-8)
        s1 = float(S[i, 0])
        assert torch.allclose(J[i] @ V[i], U[i] * S[i, :kk], atol=1e-8 * s1)  # J v_k = s_k u_k
        assert torch.allclose(J[i].T @ U[i], V[i] * S[i, :kk], atol=1e-8 * s1)  # J^T u_k = s_k v_k


@FAST
@given(jacobian_stacks(kinds=("gauss", "nan", "inf", "zero")))
def test_a_bad_matrix_does_not_change_its_neighbours(stack):
    J, kinds = stack
    whole = factorization.svd(J)
    for i, kind in enumerate(kinds):
        if kind == "gauss":
            alone = factorization.svd(J[i : i + 1])
            assert torch.allclose(whole.S[i], alone.S[0], atol=1e-12 * float(alone.S[0, 0]))


# --- coupling ---------------------------------------------------------------------------------------


@FAST
@given(
    jacobian_stacks(), st.lists(st.integers(1, 12), min_size=1, max_size=3), st.sampled_from(["ujv", "vju"])
)
def test_coupling_matches_a_direct_computation_and_is_nan_exactly_at_undefined_blocks(stack, ks, form):
    J, kinds = stack
    many = metrics.coupling_matrices(J, ks, form)
    defined = torch.tensor([kind in ("gauss", "low_rank") for kind in kinds])
    both = defined[:, None] & defined[None, :]
    for k in ks:
        m = many[k]
        assert torch.equal(m.isnan(), ~both), (kinds, m)
        single = metrics.coupling_matrix(J, k, form)  # several K at once = one at a time
        assert torch.allclose(m, single, rtol=1e-12, atol=1e-12, equal_nan=True)
        if not both.any():
            continue
        assert (m[both] >= 0).all() and (m[both] <= 2 + 1e-9).all()  # ||U^T J V||_F <= ||s_1..K||
        if all(kind == "gauss" for kind in kinds):  # unique top-K vectors almost surely
            assert torch.allclose(m, reference_coupling(J, k, form), atol=1e-8)


@FAST
@given(jacobian_stacks(kinds=("gauss", "low_rank"), n=1), st.integers(1, 12), st.floats(-5, 5))
def test_coupling_of_a_matrix_with_a_multiple_of_itself_is_zero(stack, k, log_scale):
    """``m_K(J, c J) = m_K(c J, J) = 0`` for any ``c != 0`` in the ujv form, also when ``K`` exceeds the rank
    or ``d``: ``U_K^T J V_K = diag(s_1..K)`` whatever basis the SVD picks for the null space."""
    (J,), _ = stack
    c = -(10.0**log_scale)
    m = metrics.coupling_matrix(torch.stack([J, c * J]), k)
    assert torch.allclose(m, torch.zeros(2, 2, dtype=J.dtype), atol=1e-8), m
    assert float(metrics.coupling_summary(m)) == 1.0 or abs(float(metrics.coupling_summary(m)) - 1) < 1e-12


@FAST
@given(widths, seeds, st.integers(1, 8))
def test_coupling_of_orthogonal_subspaces_is_one(d, seed, k):
    """``J_j`` acts on the first ``K`` coordinates only and ``J_i`` on the rest: ``U_{j,K}^T J_i V_{j,K} = 0``,
    so ``m_K(J_i, J_j) = ||s_i|| / ||s_i|| = 1`` and its coupling ``1 - m^2`` is 0."""
    k = min(k, d - 1)
    J_j = torch.zeros(d, d, dtype=torch.float64)
    J_j[:k, :k] = with_spectrum(seed, separated_spectrum(seed, k))
    J_i = torch.zeros(d, d, dtype=torch.float64)
    J_i[k:, k:] = gaussian(seed + 7, d - k, d - k)
    m = metrics.coupling_matrix(torch.stack([J_i, J_j]), k)
    assert abs(float(m[0, 1]) - 1.0) < 1e-10, m


@FAST
@given(widths, seeds, st.integers(1, 9), st.integers(2, 4))
def test_coupling_is_invariant_under_orthogonal_changes_of_basis(d, seed, k, n):
    """ujv: ``J -> Q J R^T`` for all blocks leaves every ``m_K`` unchanged; vju: the same with ``R = Q``."""
    J = torch.stack([with_spectrum(seed + 2 * i, separated_spectrum(seed + i, d)) for i in range(n)])
    Q, R = orthogonal(seed + 50, d), orthogonal(seed + 51, d)
    for form, (left, right) in (("ujv", (Q, R)), ("vju", (Q, Q))):
        moved = left @ J @ right.T
        assert torch.allclose(
            metrics.coupling_matrix(moved, k, form), metrics.coupling_matrix(J, k, form), atol=1e-8
        )


@FAST
@given(jacobian_stacks(kinds=("gauss",)), st.integers(1, 9), st.integers(-30, 30))
def test_coupling_and_stable_rank_are_scale_free_in_float32(stack, k, exponent):
    """Both are ratios of norms of singular values: scaling every ``J`` by ``10^e`` (squares beyond float32's
    range for ``|e| > 19``) changes neither."""
    J, _ = stack
    J = J.float() / J.abs().amax()
    scaled = J * 10.0**exponent
    assert torch.isfinite(scaled).all()
    assert torch.allclose(metrics.coupling_matrix(scaled, k), metrics.coupling_matrix(J, k), atol=1e-4)
    assert torch.allclose(
        metrics.stable_rank(factorization.svd(scaled).S), metrics.stable_rank(factorization.svd(J).S)
    )


@FAST
@given(st.integers(1, 6), st.integers(0, 3))
def test_coupling_summaries_are_means_of_the_off_diagonal(n, seed):
    m = gaussian(seed, 2, n, n).abs()
    summary, per_block = metrics.coupling_summary(m), metrics.coupling_per_block(m)
    if n < 2:
        assert torch.isnan(summary).all() and torch.isnan(per_block).all()
        return
    off = ~torch.eye(n, dtype=torch.bool)
    want = torch.stack([(1 - m[p][off] ** 2).mean() for p in range(2)])
    assert torch.allclose(summary, want, atol=1e-12)
    assert torch.allclose(per_block.mean(-1), summary, atol=1e-12)


# --- alignment ---------------------------------------------------------------------------------------


@FAST
@given(jacobian_stacks(), st.integers(1, 12))
def test_alignment_range_reference_and_nan_exactly_at_undefined_blocks(stack, k):
    J, kinds = stack
    U, _, V = factorization.svd(J)
    a = metrics.alignment_matrix(U, V, k)
    kk = min(k, J.shape[-1])
    defined = torch.tensor([kind in ("gauss", "low_rank") for kind in kinds])
    assert torch.equal(a.isnan(), ~(defined[:, None] & defined[None, :]))
    for i in range(len(kinds)):
        for j in range(len(kinds)):
            if defined[i] and defined[j]:
                want = torch.linalg.matrix_norm(
                    (U[j, :, :kk].T @ V[i, :, :kk]).abs() - torch.eye(kk, dtype=J.dtype)
                ) / math.sqrt(kk)
                assert abs(float(a[i, j] - want)) < 1e-10
                assert -1e-12 <= float(a[i, j]) <= math.sqrt(2) + 1e-12  # tr|U^T V| >= 0, ||U^T V||_F^2 <= K


@FAST
@given(widths, seeds, st.integers(1, 9))
def test_alignment_of_a_symmetric_matrix_is_zero_and_similarity_invariant(d, seed, k):
    """A symmetric ``J`` with distinct ``|eigenvalues|`` has ``u_k = +-v_k``: within-block alignment 0. Any
    ``J -> Q J Q^T`` leaves alignment unchanged (``U^T V`` is invariant)."""
    Q = orthogonal(seed, d)
    signs = torch.where(gaussian(seed + 3, d) > 0, 1.0, -1.0).double()
    sym = Q @ torch.diag(signs * separated_spectrum(seed, d)) @ Q.T
    U, _, V = factorization.svd(sym[None])
    assert float(metrics.alignment_matrix(U, V, k)[0, 0]) < 1e-8
    J = torch.stack([with_spectrum(seed + 5, separated_spectrum(seed + 6, d)), gaussian(seed + 9, d, d)])
    R = orthogonal(seed + 11, d)
    a = metrics.alignment_matrix(*factorization.svd(J)[::2], k)
    b = metrics.alignment_matrix(*factorization.svd(R @ J @ R.T)[::2], k)
    assert torch.allclose(a, b, atol=1e-8)


# --- spectra ----------------------------------------------------------------------------------------


@FAST
@given(jacobian_stacks())
def test_stable_rank_is_fro_over_spectral_norm_within_one_and_the_rank(stack):
    J, kinds = stack
    r = metrics.stable_rank(factorization.svd(J).S)
    for i, kind in enumerate(kinds):
        if kind not in ("gauss", "low_rank"):
            assert math.isnan(float(r[i]))  # non-finite: NaN; zero: 0/0
            continue
        want = torch.linalg.matrix_norm(J[i]) ** 2 / torch.linalg.matrix_norm(J[i], ord=2) ** 2
        assert abs(float(r[i] - want)) < 1e-9 * float(want)
        assert 1 - 1e-12 <= float(r[i]) <= torch.linalg.matrix_rank(J[i]) + 1e-9


@FAST
@given(st.integers(2, 10), st.integers(-300, 300), st.integers(1, 50), seeds)
def test_inverse_top_singular_fit_recovers_an_exact_line_and_nans_on_bad_values(n, slope, intercept, seed):
    depth = torch.arange(1, n + 1)
    inverse = slope * 1e-4 * depth.double() + intercept * 0.1 + 0.03 * n  # positive on 1..n
    fit = metrics.inverse_top_singular_fit(1 / inverse)
    assert abs(float(fit.slope) - slope * 1e-4) < 1e-9
    if slope != 0:
        assert abs(float(fit.r2) - 1) < 1e-9
    bad = (1 / inverse).clone()
    bad[seed % n] = [0.0, math.nan, math.inf][seed % 3]  # 1/s_1 of a zero, NaN or overflowing Jacobian
    fit = metrics.inverse_top_singular_fit(bad)
    assert all(math.isnan(float(v)) for v in fit)


# --- trajectories -----------------------------------------------------------------------------------


@st.composite
def trajectories(draw):
    steps, d, seed = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(seeds)
    return gaussian(seed, steps + 1, d) * 10.0 ** draw(st.integers(-2, 2)), seed


def reference_lss(traj: torch.Tensor) -> float:
    position = torch.zeros(traj.shape[-1], dtype=traj.dtype)
    for a, b in itertools.pairwise(traj):
        position = position + (b - a) / torch.linalg.norm(b - a)
    walked = float(torch.linalg.norm(position))
    return (traj.shape[0] - 1) / walked if walked > 0 else math.inf


@FAST
@given(trajectories(), st.integers(-2, 2), st.integers(-30, 30))
def test_line_shape_score_reference_range_and_invariances(case, scale, exponent):
    traj, seed = case
    scale = 10.0**scale
    lss = float(metrics.line_shape_score(traj))
    assert lss >= 1 - 1e-12 and math.isclose(lss, reference_lss(traj), rel_tol=1e-9)
    Q = orthogonal(seed, traj.shape[-1])
    moved = scale * traj @ Q.T + gaussian(seed + 1, traj.shape[-1])  # rotate, scale, translate
    huge = (traj / traj.abs().amax()).float() * 10.0**exponent  # float32, squares beyond its range
    if lss < 1e3:  # unit steps that (nearly) cancel: any rounding moves the score
        assert math.isclose(float(metrics.line_shape_score(moved)), lss, rel_tol=1e-9)
        assert math.isclose(float(metrics.line_shape_score(huge)), lss, rel_tol=1e-3)
    stalled = torch.cat([traj, traj[-1:]])  # a block that leaves x unchanged
    assert math.isnan(float(metrics.line_shape_score(stalled)))


@FAST
@given(seeds, st.integers(-100, 100), st.integers(-30, 30))
def test_expodistance_slopes_recover_geometric_growth_in_any_basis_and_scale(seed, rate, exponent):
    rate = rate / 100
    n, d = 6, 3
    direction = gaussian(seed, n, d)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    steps = torch.exp(rate * torch.arange(1, n + 1, dtype=torch.float64))[:, None] * direction
    traj = torch.cat([gaussian(seed + 1, 1, d), steps]).cumsum(0)
    fit = metrics.expodistance(traj)
    assert abs(float(fit.step_slope) - rate) < 1e-9
    if abs(rate) > 1e-3:
        assert abs(float(fit.step_r2) - 1) < 1e-9
    moved = metrics.expodistance(traj @ orthogonal(seed + 2, d).T)
    assert abs(float(moved.step_slope - fit.step_slope)) < 1e-9
    assert abs(float(moved.norm_slope - fit.norm_slope)) < 1e-9
    huge = (traj / traj.abs().amax()).float() * 10.0**exponent  # the logs shift, slopes do not
    big = metrics.expodistance(huge)
    small = metrics.expodistance((traj / traj.abs().amax()).float())
    assert abs(float(big.step_slope - small.step_slope)) < 1e-4
    assert abs(float(big.norm_slope - small.norm_slope)) < 1e-4
    bad = traj.clone()
    bad[seed % (n + 1), seed % d] = math.nan
    assert all(math.isnan(float(v)) for v in metrics.expodistance(bad))


@FAST
@given(seeds, st.integers(1, 6), st.integers(2, 9), st.integers(-30, 30))
def test_linearization_cosine_is_one_for_linear_blocks_and_a_cosine(seed, n, d, exponent):
    J = 0.3 * gaussian(seed, n, d, d)
    x0 = gaussian(seed + 1, d)
    x = x0
    for block in J:
        x = x + block @ x
    assert abs(float(metrics.linearization_cosine(J, x0, x)) - 1) < 1e-9
    other = gaussian(seed + 2, d)
    cos = float(metrics.linearization_cosine(J, x0, other))
    assert -1 - 1e-12 <= cos <= 1 + 1e-12
    assert math.isclose(cos, float(torch.dot(x, other) / (x.norm() * other.norm())), abs_tol=1e-9)
    f32 = (x0 / x0.abs().amax()).float()
    huge = float(metrics.linearization_cosine(J.float(), f32 * 10.0**exponent, other.float()))
    assert math.isclose(
        huge, float(metrics.linearization_cosine(J.float(), f32, other.float())), abs_tol=1e-4
    )


@FAST
@given(seeds, st.integers(1, 3), st.integers(2, 6), st.integers(1, 6), st.integers(-30, 30))
def test_trajectory_pca_ratios_are_a_share_of_the_variance(seed, P, n, d, exponent):
    traj = gaussian(seed, P, n, d)
    coords, ratio = metrics.trajectory_pca(traj)
    pooled = traj.reshape(-1, d)
    s = torch.linalg.svdvals(pooled - pooled.mean(0))
    want = torch.nn.functional.pad(s[:2] ** 2 / (s**2).sum(), (0, 2 - min(2, s.numel())))
    assert torch.allclose(ratio, want, atol=1e-12) and float(ratio.sum()) <= 1 + 1e-12
    assert torch.allclose(coords.reshape(-1, 2).norm(dim=0) ** 2 / (s**2).sum(), want, atol=1e-9)
    huge = metrics.trajectory_pca((traj / traj.abs().amax()).float() * 10.0**exponent)[1]
    assert torch.allclose(huge.double(), want, atol=1e-4)

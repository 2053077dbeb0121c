"""The CPU route of ``top_svd`` (alignscope.core.lapack_svd): every singular value and the top-K vectors
through LAPACK's bidiagonal reduction, bisection and inverse iteration, against full SVDs."""

from __future__ import annotations

import pytest
import torch

from alignscope.core import factorization, lapack_svd, metrics
from test_metrics import matrix_with, random_orthogonal

pytestmark = pytest.mark.skipif(not lapack_svd.available(), reason="this SciPy lacks the LAPACK routines")


def _sign_free_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_k . b_k|`` per column: 1 where two sets of unit vectors agree up to sign."""
    return (a * b).sum(-2).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_spectrum_over_six_decades(dtype):
    d, k = 48, 10
    U0, V0 = random_orthogonal(d, 1), random_orthogonal(d, 2)
    s0 = torch.logspace(0.5, -5.5, d, dtype=torch.float64)
    J = matrix_with(U0, s0, V0).to(dtype)
    exact = torch.linalg.svdvals(J.double())  # of the rounded matrix
    U, S, V = factorization.top_svd(J, k, method="lapack")
    assert U.shape == V.shape == (d, k) and S.shape == (d,) and S.dtype == dtype
    eps = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(S.double(), exact, rtol=0, atol=eps * float(exact[0]))
    for got, want in ((U, U0), (V, V0)):
        assert torch.allclose(
            _sign_free_overlap(got.double(), want[:, :k]), torch.ones(k, dtype=torch.float64), atol=10 * eps
        )
    assert torch.allclose(J @ V, U * S[:k], atol=10 * eps * float(exact[0]))  # J v_k = s_k u_k


def test_agrees_with_the_full_svd_and_feeds_the_metrics():
    J = torch.eye(32) + 0.3 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours, full = factorization.top_svd(J, 8, method="lapack"), factorization.svd(J)
    assert ours.U.shape == (2, 3, 32, 8) and ours.S.shape == (2, 3, 32)
    assert torch.allclose(ours.S, full.S, rtol=0, atol=1e-5 * float(full.S.max()))
    for name in ("U", "V"):
        overlap = _sign_free_overlap(getattr(ours, name), getattr(full, name)[..., :8])
        assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-5)
    flat, flat_full = (factorization.SVD(*(f.reshape(6, *f.shape[2:]) for f in x)) for x in (ours, full))
    for form in ("ujv", "vju"):
        want = metrics.coupling_matrices(J.reshape(6, 32, 32), [3, 8], form, flat_full)
        got = metrics.coupling_matrices(J.reshape(6, 32, 32), [3, 8], form, flat)
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in (3, 8))


def test_repeated_singular_values_give_orthonormal_vectors():
    """Clusters of equal singular values (2 x an orthogonal matrix, plus a block of 1s): any orthonormal basis
    of each cluster fits; the vectors must be orthonormal and satisfy J v = s u."""
    Q = random_orthogonal(20, 5)
    s = torch.cat([torch.full((6,), 2.0), torch.full((14,), 1.0)]).double()
    J = (Q * s) @ random_orthogonal(20, 6).T
    U, S, V = factorization.top_svd(J, 8, method="lapack")
    assert torch.allclose(S, s, atol=1e-12)
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-10) and torch.allclose(V.T @ V, eye, atol=1e-10)
    assert torch.allclose(J @ V, U * S[:8], atol=1e-10)


def test_a_matrix_lapack_gives_up_on_takes_the_full_svd(monkeypatch):
    J = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(lapack_svd, "top_triplets", lambda a, k: None)
    U, S, V = factorization.top_svd(J, 4, method="lapack")
    full = factorization.svd(J)
    assert torch.allclose(S, full.S)
    for got, want in ((U, full.U[..., :4]), (V, full.V[..., :4])):
        assert torch.allclose(_sign_free_overlap(got, want), torch.ones(3, 4), atol=1e-5)


def test_auto_picks_lapack_on_cpus_where_scipy_has_it(monkeypatch):
    assert factorization.top_svd_method("auto", "cpu") == "lapack"
    assert factorization.top_svd_method("auto", "cuda") == "gram"
    monkeypatch.setattr(lapack_svd, "available", lambda: False)
    assert factorization.top_svd_method("auto", "cpu") == "svd"


@pytest.mark.parametrize("spectrum", ["uniform", "log"])
def test_float32_vectors_are_orthonormal_to_float32_accuracy(spectrum):
    """Close but distinct singular values (inverse iteration in float32 would leave the vectors orthogonal only
    to ~1e-5): orthonormal and ``J v = s u`` to the accuracy of torch's float32 SVD."""
    g = torch.Generator().manual_seed(11)
    n, k = 150, 50
    s = (
        torch.rand(n, generator=g, dtype=torch.float64)
        if spectrum == "uniform"
        else torch.logspace(0, -7, n).double()
    )
    J = matrix_with(random_orthogonal(n, 8), s.sort(descending=True).values, random_orthogonal(n, 9)).float()
    U, S, V = factorization.top_svd(J, k, method="lapack")
    eye = torch.eye(k)
    assert float((U.T @ U - eye).abs().max()) < 3e-6 and float((V.T @ V - eye).abs().max()) < 3e-6
    assert float((J @ V - U * S[:k]).abs().max()) < 1e-6 * float(S[0])


def test_lapack_where_it_cannot_run_says_what_to_use(monkeypatch):
    with pytest.raises(ValueError, match="use 'gram' or 'svd'"):
        factorization.top_svd_method("lapack", "cuda")
    monkeypatch.setattr(lapack_svd, "available", lambda: False)
    with pytest.raises(ValueError, match="this SciPy lacks.*use 'svd'"):
        factorization.top_svd(torch.eye(4), 2, method="lapack")

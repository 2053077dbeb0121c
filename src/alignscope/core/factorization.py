"""Factorizations of residual Jacobians: the full SVD and the top-K singular triplets (plain torch).

Conventions as in :mod:`alignscope.core.metrics`: ``J = U diag(S) V^T`` with singular values descending; a
non-finite matrix gives all-NaN factors, a zero matrix NaN singular vectors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor

from alignscope.core import lapack_svd

__all__ = [
    "GRAM_GROUP_VALUES",
    "GRAM_MIN_RATIO",
    "SVD",
    "check_k",
    "finite_part",
    "svd",
    "top_svd",
    "top_svd_method",
    "undefined_as_nan",
]


class SVD(NamedTuple):
    """``J = U diag(S) V^T``; singular values descending. Shapes ``[..., d, d]``, ``[..., d]``, ``[..., d, d]``."""

    U: Tensor
    S: Tensor
    V: Tensor


def svd(jacobians: Tensor) -> SVD:
    """Full SVD of ``[..., d, d]`` matrices. Matrices with a non-finite entry give all-NaN factors, zero
    matrices NaN singular vectors (:func:`undefined_as_nan`)."""
    safe, finite = finite_part(jacobians)
    U, S, Vh = _linalg_svd(safe)
    return undefined_as_nan(SVD(U, S, Vh.transpose(-2, -1)), finite)


def _linalg_svd(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` of ``[..., m, n]``. On CPUs with ``p >= 2`` intra-op threads the matrices go to
    ``p`` Python threads in parts, each part's SVD with one intra-op thread (torch's thread count is set to 1
    meanwhile, then restored): LAPACK's SVD uses extra threads poorly, independent matrices use them fully
    (docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    if matrices.device.type != "cpu" or threads < 2 or flat.shape[0] < 2:
        return torch.linalg.svd(matrices)

    def one_thread_svd(part: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        torch.set_num_threads(1)
        return torch.linalg.svd(part)

    workers = min(threads, flat.shape[0])
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one_thread_svd, flat.tensor_split(workers)))
    finally:
        torch.set_num_threads(threads)
    batch = matrices.shape[:-2]
    return tuple(torch.cat(f).reshape(*batch, *f[0].shape[1:]) for f in zip(*parts, strict=True))


def finite_part(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``(the [..., m, n] matrices with every non-finite one zeroed, [...] bool: which were finite)``."""
    finite = torch.isfinite(matrices).all(dim=(-2, -1))
    return (matrices if bool(finite.all()) else torch.where(finite[..., None, None], matrices, 0.0)), finite


def undefined_as_nan(factors: SVD, finite: Tensor) -> SVD:
    """NaN for what a factorization cannot define: every factor of a matrix that was not ``finite``
    (``[...]`` bool), and the singular vectors of a zero matrix (``s_1 = 0``: every orthonormal basis fits,
    so what an SVD routine returns there is arbitrary). ``U``, ``V``: ``[..., m, k]``, ``S``: ``[..., n]``."""
    U, S, V = factors
    defined = finite & (S[..., 0] > 0)
    if bool(defined.all()):
        return factors
    nan = torch.tensor(float("nan"), dtype=S.dtype, device=S.device)
    return SVD(
        torch.where(defined[..., None, None], U, nan),
        torch.where(finite[..., None], S, nan),
        torch.where(defined[..., None, None], V, nan),
    )


GRAM_MIN_RATIO = 1e-6
""":func:`top_svd` with ``method="gram"`` forms ``U_K = J V_K / S_K`` only where ``s_K >= GRAM_MIN_RATIO s_1``;
a matrix with a smaller top-K singular value (rank-deficient within K) takes the full SVD instead."""


def top_svd(jacobians: Tensor, k: int, method: str = "auto") -> SVD:
    """Every singular value and the top-``k`` singular vectors of ``[..., d, d]`` matrices: ``U``, ``V``
    ``[..., d, k]``, ``S`` ``[..., d]`` (descending). Non-finite matrices give NaN factors and zero matrices
    NaN vectors, as :func:`svd`.

    ``method="svd"``: the full SVD, truncated. ``method="gram"``: ``J^T J = V diag(S^2) V^T`` by a symmetric
    eigendecomposition in float64 (squares of float32 entries and their sums are exact to ~1e-16, so every
    singular value has absolute error about ``1e-8 s_1``, below a float32 SVD's ``~1e-7 s_1``), then
    ``U_k = J V_k / S_k``. On a GPU that is several times faster than cuSOLVER's SVD at large ``d``
    (docs/benchmarks.md); on CPUs the two cost the same. ``method="lapack"`` (CPU tensors, float32 or float64):
    the reduction to bidiagonal form, every singular value, and the top-``k`` vectors alone
    (:mod:`alignscope.core.lapack_svd`), without back-transforming the other ``d - k`` vectors as a full SVD
    does. ``"auto"``: gram on CUDA, lapack on CPUs where SciPy provides it, else svd.
    """
    method = top_svd_method(method, jacobians.device)
    k = check_k(k, jacobians.shape[-1])
    if method == "lapack" and jacobians.dtype not in (torch.float32, torch.float64):
        method = "svd"
    if method == "lapack":
        safe, finite = finite_part(jacobians)
        return undefined_as_nan(SVD(*lapack_svd.top_svd(safe, k)), finite)
    if method == "svd":
        U, S, V = svd(jacobians)
        return SVD(U[..., :k], S, V[..., :k])
    d = jacobians.shape[-1]
    flat = jacobians.reshape(-1, d, d)
    group = max(1, GRAM_GROUP_VALUES // (d * d))  # bounds the float64 temporaries (J, J^T J, eigenvectors)
    if flat.shape[0] > group:
        parts = [_gram_top_svd(flat[i : i + group], k) for i in range(0, flat.shape[0], group)]
        U, S, V = (torch.cat(factor) for factor in zip(*parts, strict=True))
        batch = jacobians.shape[:-2]
        return SVD(U.reshape(*batch, d, k), S.reshape(*batch, d), V.reshape(*batch, d, k))
    return _gram_top_svd(jacobians, k)


def top_svd_method(method: str, device: torch.device | str) -> str:
    """The method :func:`top_svd` runs on ``device``: ``"auto"`` is ``"gram"`` on CUDA, ``"lapack"`` on CPUs
    where :func:`alignscope.core.lapack_svd.available`, else ``"svd"``."""
    if method not in ("auto", "svd", "gram", "lapack"):
        raise ValueError(f"method must be 'auto', 'svd', 'gram' or 'lapack', got {method!r}")
    if method == "lapack" and torch.device(device).type != "cpu":
        raise ValueError(f"method 'lapack' factors CPU tensors, not {device} ones: use 'gram' or 'svd' there")
    if method == "lapack" and not lapack_svd.available():
        raise ValueError(
            "method 'lapack' needs SciPy's bundled OpenBLAS LAPACK (scipy.linalg.cython_lapack and "
            "openblas_set_num_threads_local, in the PyPI wheels of recent SciPy), which this SciPy lacks: "
            "use 'svd', or 'auto' (which picks it only where available)"
        )
    if method != "auto":
        return method
    if torch.device(device).type == "cuda":
        return "gram"
    return "lapack" if lapack_svd.available() else "svd"


GRAM_GROUP_VALUES = 2**28
"""Matrix entries per group of :func:`top_svd`'s Gram route (each float64 temporary at most 2 GiB)."""


def _gram_top_svd(jacobians: Tensor, k: int) -> SVD:
    safe, finite = finite_part(jacobians)
    j64 = safe.double()
    eigenvalues, vectors = torch.linalg.eigh(j64.transpose(-2, -1) @ j64)
    S = eigenvalues.flip(-1).clamp_min(0).sqrt()
    V = vectors[..., -k:].flip(-1)
    top = S[..., :k]
    U = (j64 @ V) / top.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
    deficient = (top[..., -1] < GRAM_MIN_RATIO * top[..., 0]) & finite
    if bool(deficient.any()):  # U_K undefined by J V_K / S_K: take those matrices' full SVDs
        full = svd(j64[deficient])
        U[deficient], V[deficient], S[deficient] = full.U[..., :k], full.V[..., :k], full.S
    dtype = jacobians.dtype
    return undefined_as_nan(SVD(U.to(dtype), S.to(dtype), V.to(dtype)), finite)


def check_k(k: int, d: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"K must be a positive integer, got {k!r}")
    return min(k, d)

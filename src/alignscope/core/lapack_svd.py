"""Every singular value and the top-K singular vectors of square matrices on CPUs, through SciPy's LAPACK
(OpenBLAS), without computing the other singular vectors.

For each ``[n, n]`` matrix ``A``: ``?gebrd`` reduces it to upper bidiagonal form ``A = Q B P^T``; ``?bdsdc``
gives every singular value of ``B`` (those of ``A``); bisection and inverse iteration (``?stebz``,
``?stein``) on the Golub-Kahan tridiagonal of ``B`` (zero diagonal, off-diagonal ``d_1, e_1, d_2, ..., d_n``,
whose eigenvector of ``s`` is ``(v_1, u_1, v_2, u_2, ...) / sqrt(2)``) give ``B``'s top-K singular vectors;
``?ormbr`` applies ``Q`` and ``P`` to those K columns only, and a Rayleigh-Ritz step on their spans
(:func:`rayleigh_ritz`) makes them orthonormal to the matrix's precision. A full SVD also back-transforms the other ``n - K``
vectors, most of its cost after the reduction.

The routines come from ``scipy.linalg.cython_lapack`` through ctypes, which releases the GIL during each call,
so the matrices of a batch run on parallel threads, each with one OpenBLAS thread
(``openblas_set_num_threads_local``). :func:`available` says whether this SciPy provides all of it. A matrix
this route cannot factor reliably (an iteration that does not converge, a K-th singular value below
``MIN_RATIO s_1``) is left to ``torch.linalg.svd``.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

_I = ctypes.POINTER(ctypes.c_int)
_C = ctypes.c_char_p
MIN_RATIO = 1e-6
"""A matrix whose K-th singular value is below ``MIN_RATIO s_1`` (rank-deficient within K) takes
``torch.linalg.svd``: inverse iteration does not separate the singular vectors of (nearly) zero values."""


@functools.cache
def _routines(prefix: str) -> dict[str, Any] | None:
    """The five LAPACK routines for float32 (``prefix="s"``) or float64 (``"d"``) as ctypes functions, or
    None when SciPy does not provide them."""
    try:
        import scipy.linalg.cython_lapack as cython_lapack
    except ImportError:
        return None
    real = ctypes.POINTER(ctypes.c_float if prefix == "s" else ctypes.c_double)
    f, i, c = real, _I, _C
    signatures = {
        "gebrd": (i, i, f, i, f, f, f, f, f, i, i),
        "bdsdc": (c, c, i, f, f, f, i, f, i, f, i, f, i, i),
        "stebz": (c, c, i, f, f, i, i, f, f, f, i, i, f, i, i, f, i, i),
        "stein": (i, f, f, i, f, i, i, f, i, f, i, i, i),
        "ormbr": (c, c, c, i, i, i, f, i, f, f, i, f, i, i),
    }
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    out = {}
    for name, argtypes in signatures.items():
        capsule = getattr(cython_lapack, "__pyx_capi__", {}).get(prefix + name)
        if capsule is None:
            return None
        pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
        out[name] = ctypes.CFUNCTYPE(None, *argtypes)(pointer)
    return out


@functools.cache
def _thread_setter() -> Any:
    """SciPy's OpenBLAS ``openblas_set_num_threads_local`` (threads of the calling thread), or None."""
    try:
        import scipy
    except ImportError:
        return None
    pattern = os.path.join(os.path.dirname(scipy.__file__), "..", "scipy.libs", "libscipy_openblas*")
    for path in glob.glob(pattern):
        setter = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
        if setter is not None:
            setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
            return setter
    return None


def available() -> bool:
    """Whether this SciPy provides the routines (float32 and float64) and OpenBLAS's per-thread thread count."""
    return _routines("s") is not None and _routines("d") is not None and _thread_setter() is not None


def _ref(value: int) -> Any:
    return ctypes.byref(ctypes.c_int(value))


def _ptr(array: np.ndarray) -> Any:
    return array.ctypes.data_as(ctypes.POINTER(np.ctypeslib.as_ctypes_type(array.dtype)))


def _workspace(call, query: np.ndarray) -> np.ndarray:
    """Run ``call(work, lwork)`` as a workspace query, then with the workspace it asked for."""
    call(query, -1)
    work = np.empty(max(1, int(query[0])), query.dtype)
    call(work, work.size)
    return work


def top_triplets(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(U_k [n, k], S [n], V_k [n, k])`` of one finite ``[n, n]`` float32 or float64 matrix ``a``, singular
    values descending; None when LAPACK reports that an iteration did not converge, the K-th singular value is
    below ``MIN_RATIO s_1`` or the inverse iteration's vectors are not unit vectors."""
    lapack = _routines("s" if a.dtype == np.float32 else "d")
    assert lapack is not None
    n, dtype = a.shape[0], a.dtype
    at = np.array(a, dtype=dtype, order="C")  # read column-major by LAPACK: a^T
    d, e = np.empty(n, dtype), np.zeros(max(n - 1, 1), dtype)
    tauq, taup, info, query = np.empty(n, dtype), np.empty(n, dtype), ctypes.c_int(0), np.empty(1, dtype)

    def gebrd(work: np.ndarray, size: int) -> None:
        lapack["gebrd"](_ref(n), _ref(n), _ptr(at), _ref(n), _ptr(d), _ptr(e), _ptr(tauq), _ptr(taup),
                        _ptr(work), _ref(size), ctypes.byref(info))  # fmt: skip

    _workspace(gebrd, query)
    if info.value != 0:
        return None
    left, right = _bidiagonal_top(d, e, k)  # a^T's: B's top vectors, transformed below
    if left is None or not _unit_rows(left) or not _unit_rows(right):
        return None
    values, none, iwork = d.copy(), np.empty(1, dtype), np.empty(8 * n, np.int32)
    work = np.empty(4 * n, dtype)
    lapack["bdsdc"](b"U", b"N", _ref(n), _ptr(values), _ptr(e.copy()), _ptr(none), _ref(1), _ptr(none), _ref(1),
                    _ptr(none), _ptr(iwork[:1]), _ptr(work), _ptr(iwork), ctypes.byref(info))  # fmt: skip
    if info.value != 0 or values[k - 1] < MIN_RATIO * values[0]:
        return None
    for vect, tau, columns in ((b"Q", tauq, left), (b"P", taup, right)):

        def ormbr(work: np.ndarray, size: int, vect=vect, tau=tau, columns=columns) -> None:
            lapack["ormbr"](vect, b"L", b"N", _ref(n), _ref(k), _ref(n), _ptr(at), _ref(n), _ptr(tau),
                            _ptr(columns), _ref(n), _ptr(work), _ref(size), ctypes.byref(info))  # fmt: skip

        _workspace(ormbr, query)
        if info.value != 0:
            return None
    # a^T = (Q U_B) S (P V_B)^T: a's left vectors are P V_B's columns, its right ones Q U_B's
    return right.T, values, left.T


def _unit_rows(vectors: np.ndarray) -> bool:
    """Whether every row has norm 1 (to 1e-3): a Golub-Kahan eigenvector splits evenly between its left and
    right halves unless its singular value is (nearly) zero or shared with another."""
    return bool(np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1) < 1e-3))


def _bidiagonal_top(d: np.ndarray, e: np.ndarray, k: int):
    """The top-k left and right singular vectors of the upper bidiagonal ``B`` (diagonal ``d``,
    superdiagonal ``e``) as ``[k, n]`` arrays (rows: vectors, descending), or ``(None, None)``."""
    lapack = _routines("s" if d.dtype == np.float32 else "d")
    assert lapack is not None
    n, dtype = d.shape[0], d.dtype
    m = 2 * n
    off = np.empty(m - 1, dtype)
    off[0::2], off[1::2] = d, e[: n - 1]
    diag, zero = np.zeros(m, dtype), np.zeros(1, dtype)
    w, iblock, isplit = np.empty(m, dtype), np.empty(m, np.int32), np.empty(m, np.int32)
    work, iwork = np.empty(5 * m, dtype), np.empty(3 * m, np.int32)
    found, blocks, info = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lapack["stebz"](b"I", b"B", _ref(m), _ptr(zero), _ptr(zero), _ref(m - k + 1), _ref(m), _ptr(zero), _ptr(diag),
                    _ptr(off), ctypes.byref(found), ctypes.byref(blocks), _ptr(w), _ptr(iblock), _ptr(isplit),
                    _ptr(work), _ptr(iwork), ctypes.byref(info))  # fmt: skip
    if info.value != 0 or found.value != k:
        return None, None
    z, ifail = np.empty((k, m), dtype), np.empty(k, np.int32)  # column-major m x k
    lapack["stein"](_ref(m), _ptr(diag), _ptr(off), _ref(k), _ptr(w), _ptr(iblock), _ptr(isplit), _ptr(z), _ref(m),
                    _ptr(work), _ptr(iwork), _ptr(ifail), ctypes.byref(info))  # fmt: skip
    if info.value != 0:
        return None, None
    z = z[np.argsort(-w[:k], kind="stable")] * dtype.type(np.sqrt(2.0))
    return np.ascontiguousarray(z[:, 1::2]), np.ascontiguousarray(z[:, 0::2])


def top_svd(matrices: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U [..., n, k], S [..., n], V [..., n, k])`` of finite ``[..., n, n]`` CPU matrices (float32 or
    float64), one thread per matrix on ``torch.get_num_threads()`` threads (a matrix this route cannot
    factor takes ``torch.linalg.svd``), the vectors then cleaned up together (:func:`rayleigh_ritz`)."""
    batch, n = matrices.shape[:-2], matrices.shape[-1]
    flat = matrices.detach().reshape(-1, n, n).numpy()
    setter = _thread_setter()

    def one(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before = setter(1)
        try:
            out = top_triplets(a, k)
        finally:
            setter(before)
        if out is None:
            U, S, Vh = torch.linalg.svd(torch.from_numpy(a))
            return U[:, :k].numpy(), S.numpy(), Vh[:k].T.numpy()
        return out

    workers = max(1, min(torch.get_num_threads(), len(flat)))
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(one, flat))
    U, S, V = (torch.from_numpy(np.stack(f)) for f in zip(*parts, strict=True))
    U, V = rayleigh_ritz(torch.from_numpy(flat), U, V)
    return U.reshape(*batch, n, k), S.reshape(*batch, n), V.reshape(*batch, n, k)


def rayleigh_ritz(matrices: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """The top-k singular vectors of ``matrices`` ``[b, n, n]`` within the spans of ``U`` and ``V``
    (``[b, n, k]``): orthonormal bases of both, then the SVD of each matrix projected on them (``k x k``, in
    float64). Inverse iteration leaves the vectors of close (not clustered) singular values orthogonal only to
    ~1e-5 in float32; their spans are accurate, and this makes them orthonormal to the matrices' precision."""
    Qu, Qv = _orthonormal(U), _orthonormal(V)
    Um, _, Vmh = torch.linalg.svd((Qu.mT @ (matrices @ Qv)).double())
    return Qu @ Um.to(U.dtype), Qv @ Vmh.mT.to(V.dtype)


def _orthonormal(X: Tensor) -> Tensor:
    """An orthonormal basis of the span of nearly orthonormal columns ``X`` ``[b, n, k]`` (Cholesky QR in
    float64: ``X^T X = L L^T``, ``Q = X L^{-T}``; exact to rounding for columns this close to orthonormal)."""
    X64 = X.double()
    L = torch.linalg.cholesky(X64.mT @ X64)
    return torch.linalg.solve_triangular(L, X64.mT, upper=False).mT.to(X.dtype)

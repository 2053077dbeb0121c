"""The ways :func:`alignscope.core.factorization.top_svd` factors one token's residual Jacobians on CPUs.

The Jacobians are SmolLM2-135M's 30 blocks at the last token of a random T-token prompt. Methods: ``svd``
(``torch.linalg.svd``, every singular vector; MKL in the CPU wheels), ``lapack`` (SciPy's LAPACK with the GIL
released: bidiagonal form, every singular value, the top-K vectors alone; :mod:`alignscope.core.lapack_svd`)
and ``gram`` (float64 eigendecomposition of ``J^T J``). For each: seconds (best of ``--repeats``), the
largest difference of its singular values from the ``svd`` method's (relative to s_1), and the largest
``1 - |cos|`` between its top-K singular vectors and the ``svd`` method's.

Usage: python scripts/bench_svd_routes.py [--seq 64] [--k 50] [--repeats 3] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchlib import append_markdown, zoo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from alignscope import probe
    from alignscope.core.factorization import top_svd

    model, _ = zoo_model("smollm2_135m")
    ids = torch.randint(0, 1000, (1, args.seq), generator=torch.Generator().manual_seed(0))
    jac = probe(model, ids, ks=(args.k,), keep_jacobians=True).jacobians[0].contiguous()  # [L, d, d]
    reference = top_svd(jac, args.k, "svd")
    rows = [
        "| method | seconds for the 30 | max abs d(S) / s_1 | max 1 - abs(cos) of the top-K vectors |",
        "|---|---|---|---|",
    ]
    for method in ("svd", "lapack", "gram"):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = top_svd(jac, args.k, method)
            best = min(best, time.perf_counter() - start)
        ds = float(((out.S - reference.S).abs().max(-1).values / reference.S[:, 0]).max())
        cos = max(
            float((1 - (x * r).sum(-2).abs()).abs().max())
            for x, r in ((out.U, reference.U), (out.V, reference.V))
        )
        rows.append(f"| {method} | {best:.3f} | {ds:.1e} | {cos:.1e} |")
        print(rows[-1], flush=True)
    intro = (
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"SmolLM2-135M, T = {args.seq}, K = {args.k}, best of {args.repeats}. Command: "
        "`python scripts/bench_svd_routes.py`."
    )
    if args.markdown:
        append_markdown(args.markdown, "SVD methods for one token's 30 Jacobians", intro, rows)


if __name__ == "__main__":
    main()

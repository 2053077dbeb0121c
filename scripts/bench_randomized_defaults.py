"""How the randomized engine's defaults were chosen: its accuracy on SmolLM2-135M's trained blocks.

The exact residual Jacobians of the 30 blocks (last token of the first N default prompts) are computed once;
then RandomizedSVD runs on each of them as a matrix (the sketch's accuracy depends only on the matrix, not
on how its products are computed), for a grid of oversampling p and power iterations q, and its m_K is
compared with the exact m_K in two ways:
  - "sketch": m_K from the rank-r factors alone (U_j^T (U_i S_i V_i^T) V_j), never touching J again;
  - "projected": the exact projections U_j^T J_i V_j with the sketch's vectors (what probe() does, by
    2 L K JVPs per block-token).
Prints the largest and mean |m_K error| over all block pairs and prompts, the largest error of the summary
coupling_K, the largest top-K singular-value error (share of s_1), and the products per block-token.

Usage: python scripts/bench_randomized_defaults.py [--prompts 4] [--k 10] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse

import torch

from benchlib import append_markdown, zoo_model


class MatrixOperator:
    """A residual Jacobian given as a matrix, behind the operator interface the range finder uses."""

    def __init__(self, J: torch.Tensor) -> None:
        self.J, self.d, self.x = J, J.shape[0], torch.zeros(J.shape[0], dtype=J.dtype)

    def jvp(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.J.T

    def vjp(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.J


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from alignscope import probe
    from alignscope.apps.prompts import load_prompts
    from alignscope.core import metrics
    from alignscope.core.randomized import RandomizedSVD

    model, tok = zoo_model("smollm2_135m")
    ids = [tok(p)["input_ids"] for p in load_prompts(num=args.prompts, seed=0)]
    exact = probe(model, ids, ks=(args.k,), keep_jacobians=True)
    k, jacobians = args.k, exact.jacobians  # [P, L, d, d]
    d = jacobians.shape[-1]
    header = (
        f"| p | q | products (sketch) | sketch m_K: max / mean error | projected m_K: max / mean error | "
        f"projected coupling/k{k} error | top-{k} s error (of s_1) |"
    )
    lines = [header, "|" + "---|" * 7]
    print(header, flush=True)
    for p, q in [(10, 0), (10, 1), (15, 1), (20, 1), (5, 2), (10, 2), (20, 2), (10, 3)]:
        engine = RandomizedSVD(oversample=p, power_iters=q)
        sketch_err, proj_err, summary_err, s_err = [], [], [], []
        for P, Js in enumerate(jacobians):
            low = [engine(MatrixOperator(J), k) for J in Js]
            U, S, V = (torch.stack([getattr(x, f) for x in low]) for f in ("U", "S", "V"))
            truth = exact.coupling[k][P]
            a = torch.einsum("jak,iar->ijkr", U[..., :k], U)
            b = torch.einsum("iar,jal->ijrl", V, V[..., :k])
            from_sketch = torch.einsum("ijkr,ir,ijrl->ijkl", a, S, b)
            projected = torch.einsum("jak,iab,jbl->ijkl", U[..., :k], Js, V[..., :k])
            m_sketch = metrics.coupling_from_projections(from_sketch, S, {k: k})[k]
            m_proj = metrics.coupling_from_projections(projected, S, {k: k})[k]
            sketch_err.append((m_sketch - truth).abs())
            proj_err.append((m_proj - truth).abs())
            summary_err.append(abs(float(metrics.coupling_summary(m_proj) - metrics.coupling_summary(truth))))
            s_true = exact.singular_values[P][:, :k]
            s_err.append(float(((S[:, :k] - s_true).abs() / s_true[:, :1]).max()))
        se, pe = torch.stack(sketch_err), torch.stack(proj_err)
        line = (
            f"| {p} | {q} | {engine.products(k, d)} | {float(se.max()):.4f} / {float(se.mean()):.4f} | "
            f"{float(pe.max()):.4f} / {float(pe.mean()):.4f} | {max(summary_err):.4f} | {max(s_err):.4f} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        append_markdown(
            args.markdown,
            "Randomized engine defaults on SmolLM2-135M's trained blocks",
            f"Command: `python scripts/bench_randomized_defaults.py --prompts {args.prompts} --k {k}`. The exact "
            f"residual Jacobians of the 30 blocks (last token of {args.prompts} default prompts) are sketched as "
            "matrices; errors are against the exact m_K over all ordered block pairs and prompts.",
            lines,
        )


if __name__ == "__main__":
    main()

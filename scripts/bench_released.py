"""alignscope's probe() against the paper's released pipeline, side by side in one process.

The released method (as in its code): one forward with ``output_hidden_states``, block ``j`` taken as
``hidden_states[j] -> hidden_states[j+1]`` at the last token, each block's Jacobian by batched VJPs through the
full-sequence graph (``d`` identity rows, ``is_grads_batched``), minus I; full SVDs; ``m_K`` for every ordered
block pair in a Python loop. alignscope: ``probe(model, ids, ks=...)`` with its default engine (all blocks,
the last token). Both on the same model and prompt, each best of --repeats, alternating (a released run
longer than --repeat-under seconds is not repeated); the largest difference of their m_K over blocks 0..L-2
(the released last "block" includes the final norm) is reported.

The arithmetic floor of the whole probe is its unavoidable flops at the measured float32 matmul rate:
the Jacobians (``2 x`` block matrix parameters ``x d`` per block), the coupling projections of both forms
(``2 x 2 L^2 Kmax d^2``), the forward pass of the prompt (``2 x`` block matrix parameters ``x T`` per
block) and the bidiagonalization every SVD starts with (``8/3 d^3`` per block).

Usage: python scripts/bench_released.py [--seqs 16 64 256] [--model smollm2_135m] [--repeats 2]
                                        [--repeat-under 120] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchlib import append_markdown, matmul_rate, matrix_params, released_pipeline, zoo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 30, 50])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--repeat-under", type=float, default=120.0)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from alignscope import probe
    from alignscope.models.capture import probe_mode

    model, _ = zoo_model(args.model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rate = matmul_rate() / 1e9
    from alignscope.models import get_adapter

    blocks = get_adapter(model).blocks(model)
    d, n, kmax = model.config.hidden_size, len(blocks), max(args.ks)
    params = sum(matrix_params(b) for b in blocks)

    def floor(seq: int) -> float:
        flops = 2 * params * d + 4 * n * n * kmax * d * d + 2 * params * seq + n * 8 / 3 * d**3
        return flops / (rate * 1e9)

    header = (
        "| T | released pipeline (s) | alignscope probe() (s) | of which analysis (s) | speed-up | "
        "probe / arithmetic floor | max abs diff of m_K (blocks 0..L-2) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    for seq in args.seqs:
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(0))
        best = {"released": float("inf"), "probe": float("inf"), "analysis": float("inf")}
        for repeat in range(args.repeats):
            if repeat == 0 or best["released"] < args.repeat_under:
                with probe_mode(model):
                    start = time.perf_counter()
                    ref = released_pipeline(model, ids, args.ks)
                    best["released"] = min(best["released"], time.perf_counter() - start)
            start = time.perf_counter()
            res = probe(model, ids, ks=tuple(args.ks))
            seconds = time.perf_counter() - start
            if seconds < best["probe"]:
                best["probe"], best["analysis"] = seconds, res.meta["analysis_seconds"]
        diff = max(float((res.coupling[k][0, :-1, :-1] - ref[k][:-1, :-1]).abs().max()) for k in args.ks)
        row = (
            f"| {seq} | {best['released']:.1f} | {best['probe']:.2f} | {best['analysis']:.2f} | "
            f"{best['released'] / best['probe']:.1f}x | {best['probe'] / floor(seq):.1f}x "
            f"({floor(seq):.2f} s) | {diff:.1e} |"
        )
        lines.append(row)
        print(row, flush=True)
    intro = (
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"float32 matmul {rate:.0f} GFLOP/s. Model: {args.model}, all blocks, last token, K in {args.ks}, "
        f"best of {args.repeats} (a released run over {args.repeat_under:.0f} s: once). Command: "
        f"`python scripts/bench_released.py --seqs {' '.join(map(str, args.seqs))}`."
    )
    if args.markdown:
        append_markdown(args.markdown, "probe() against the released pipeline", intro, lines)


if __name__ == "__main__":
    main()

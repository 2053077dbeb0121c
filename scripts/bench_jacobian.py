"""Jacobian engines against the arithmetic floor and the reference method.

For d in {128, 576, 768} and sequence lengths T in {16, 128, 512}: the time of one block-token Jacobian
(the last token) for
  - reference (loop): reverse mode through the block's full-sequence call, one VJP per output coordinate,
    as the paper's code does;
  - exact (chunked): the same, vectorized over 32 identity rows at a time (alignscope's "exact" engine);
  - single_token: the block called on the token alone against the model's KV cache (alignscope's default for
    causal decoders): "probe default" is what probe() runs on CPUs (batched VJPs, rows by context length,
    the cache a constant), "copies" the copies of the token sharing one call (CUDA's plan for long contexts);
and the floor: 2 x (parameters of the block's weight matrices) x d flops at this machine's measured float32
matmul rate (a 2048^3 matmul in the same run). d = 128 and 768 are GPT-2-shaped blocks (4d MLP, 4 heads /
12 heads); d = 576 is SmolLM2-135M's Llama block (9 heads, 3 KV heads, MLP 1536).

With --smollm2, also a full probe of SmolLM2-135M (30 blocks, last token, 8 prompts, K in {10, 30, 50},
all block pairs), model loading excluded, with the process's peak RSS.

Usage: python scripts/bench_jacobian.py [--dims 128 576 768] [--seqs 16 128 512] [--smollm2]
                                        [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from benchlib import append_markdown, block_model, block_token, matmul_rate, matrix_params, zoo_model

DIMS = [128, 576, 768]
"""Widths of the benchmark table."""
SEQS = [16, 128, 512]
"""Sequence lengths of the benchmark table."""
TOP_K = 10
"""K of the randomized engine's timing column (d = 768, K = 10 in the table)."""


def time_engines(d: int, seq: int, budget_s: float) -> dict:
    from alignscope.autodiff.jacobian import ReverseModeEngine, jacobian_by_copies
    from alignscope.models.capture import (
        block_function,
        probe_mode,
        token_block_function,
        token_copies_function,
    )
    from alignscope.probing.plan import Plan

    model = block_model(d)
    out = {"d": d, "T": seq}
    with probe_mode(model):
        case = block_token(model, seq)
        adapter, block, token, full = case.adapter, case.block, case.token, case.full()
        out["matrix_params"] = matrix_params(block)
        t = torch.tensor([seq - 1])
        zero = torch.tensor([0])
        copies_fn = token_copies_function(block, token, adapter, torch.float32)
        rows = Plan().token_chunk(seq - 1)

        def on_copies(fn, x, t_in, t_out):
            return jacobian_by_copies(copies_fn, x[0], Plan().sketch_copies_chunk)[None]

        runs = {
            "reference_loop": (
                ReverseModeEngine(vectorize=False),
                block_function(block, full, adapter, torch.float32),
                full.input[0],
                t,
            ),
            "exact": (
                ReverseModeEngine(chunk_size=32),
                block_function(block, full, adapter, torch.float32),
                full.input[0],
                t,
            ),
            "single_token": (  # what probe() runs by default on CPUs
                ReverseModeEngine(chunk_size=rows),
                token_block_function(block, token, adapter, torch.float32),
                token.input[0],
                zero,
            ),
            "single_token_copies": (on_copies, None, token.input[0], zero),
        }
        results = {}
        from alignscope.autodiff.linearized import LinearizedBlock
        from alignscope.core.randomized import RandomizedSVD
        from alignscope.probing.engines.randomized import row_function

        row_fn, x_row = row_function(block, token, adapter, torch.float32, None)
        sketch = RandomizedSVD()

        def randomized_top_k():
            return sketch(LinearizedBlock(row_fn, x_row, rows), TOP_K)  # probe()'s CPU plan

        if copies_fn is None:
            del runs["single_token_copies"]
            out["single_token_copies"] = float("nan")
        for name, (engine, fn, x, pos) in runs.items():
            start = time.perf_counter()
            results[name] = engine(fn, x, pos, pos)[0]
            first = time.perf_counter() - start
            times = [first]
            while (
                sum(times) < budget_s and len(times) < 3
            ):  # repeat the fast ones, keep the slow ones to one run
                start = time.perf_counter()
                engine(fn, x, pos, pos)
                times.append(time.perf_counter() - start)
            out[name] = min(times)
        out["max_diff"] = float(max((results[k] - results["exact"]).abs().max() for k in results))
        times = []
        while (sum(times) < budget_s and len(times) < 3) or not times:
            start = time.perf_counter()
            low = randomized_top_k()
            times.append(time.perf_counter() - start)
        out["randomized"] = min(times)
        exact_s = torch.linalg.svdvals(results["exact"] - torch.eye(d))[:TOP_K]
        out["randomized_sv_err"] = float(((low.S[:TOP_K] - exact_s).abs() / exact_s[0]).max())
    return out


def large_block(d: int, seq: int) -> dict:
    """Exact single-token (probe default) against randomized top-K on one block-token of width ``d`` (the
    full-sequence engines are left out: hours at d = 4096 on a CPU)."""
    from alignscope.autodiff.jacobian import ReverseModeEngine
    from alignscope.autodiff.linearized import LinearizedBlock
    from alignscope.core.randomized import RandomizedSVD
    from alignscope.models.capture import probe_mode, token_block_function
    from alignscope.probing.engines.randomized import row_function
    from alignscope.probing.plan import Plan

    model = block_model(d)
    with probe_mode(model):
        case = block_token(model, seq)
        adapter, block, token = case.adapter, case.block, case.token
        fn = token_block_function(block, token, adapter, torch.float32)
        zero = torch.tensor([0])
        start = time.perf_counter()
        engine = ReverseModeEngine(chunk_size=Plan().token_chunk(seq - 1))
        jac = engine(fn, token.input[0], zero, zero)[0] - torch.eye(d)
        exact = time.perf_counter() - start
        row_fn, x_row = row_function(block, token, adapter, torch.float32, None)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            low = RandomizedSVD()(LinearizedBlock(row_fn, x_row, Plan().token_chunk(seq - 1)), TOP_K)
            times.append(time.perf_counter() - start)
        s_exact = torch.linalg.svdvals(jac)[:TOP_K]
        return {
            "d": d,
            "T": seq,
            "matrix_params": matrix_params(block),
            "exact": exact,
            "randomized": min(times),
            "sv_err": float(((low.S[:TOP_K] - s_exact).abs() / s_exact[0]).max()),
            "within": bool(((low.S[:TOP_K] - s_exact).abs() <= low.residuals + 1e-4 * s_exact[0]).all()),
        }


def smollm2_probe() -> dict:
    from alignscope import probe
    from alignscope.apps.prompts import load_prompts
    from alignscope.core import metrics

    model, tok = zoo_model("smollm2_135m")
    ids = [tok(p)["input_ids"] for p in load_prompts(num=8, seed=0)]
    out, results = {}, {}
    for engine in ("single_token", "exact"):
        start = time.perf_counter()
        results[engine] = res = probe(model, ids, ks=(10, 30, 50), engine=engine)
        out[engine] = time.perf_counter() - start
        out[f"{engine}_coupling_k10"] = res.scalars()["coupling/k10"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    exact = results["single_token"]
    start = time.perf_counter()
    rand = probe(model, ids, ks=(TOP_K,), engine="randomized")
    out["randomized"] = time.perf_counter() - start
    err = (rand.coupling[TOP_K] - exact.coupling[TOP_K]).abs()
    bound = rand.extras[f"coupling_error_k{TOP_K}"]
    s_exact = exact.singular_values[..., :TOP_K]
    out["rand_m_max_err"] = float(err.max())
    out["rand_m_mean_err"] = float(err.mean())
    out["rand_summary_err"] = float(
        (metrics.coupling_summary(rand.coupling[TOP_K]) - metrics.coupling_summary(exact.coupling[TOP_K]))
        .abs()
        .max()
    )
    out["rand_within_bound"] = float((err <= bound).float().mean())
    out["rand_bound_median"] = float(bound.median())
    out["rand_sv_rel_err"] = float(
        ((rand.singular_values[..., :TOP_K] - s_exact).abs() / s_exact[..., :1]).max()
    )
    out["rand_sv_within"] = float(
        ((rand.singular_values[..., :TOP_K] - s_exact).abs() <= rand.extras["triplet_residuals"] + 1e-5)
        .float()
        .mean()
    )
    out["rand_products"] = rand.meta["randomized"]["products_per_block_token"]
    out["tokens"] = sum(len(x) for x in ids)
    return out


def command_options(args: argparse.Namespace) -> str:
    """The options of this run as a command line would give them (defaults left out)."""
    out = ""
    if args.dims != DIMS:
        out += " --dims " + " ".join(map(str, args.dims))
    if args.seqs != SEQS:
        out += " --seqs " + " ".join(map(str, args.seqs))
    if args.smollm2:
        out += " --smollm2"
    return out + "".join(f" --large {t}" for t in args.large)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=DIMS)
    parser.add_argument("--seqs", type=int, nargs="+", default=SEQS)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per engine for repeats")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument(
        "--large",
        type=int,
        nargs="*",
        default=[],
        help="also d = 4096 at these T (exact single-token vs randomized)",
    )
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    rate = matmul_rate()
    print(f"float32 matmul rate: {rate / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    header = (
        "| d | T | floor (s) | reference loop | exact (chunk 32) | single_token (probe default) | "
        "single_token (copies) | best single_token / floor | reference / best single_token | max diff | "
        f"randomized top-{TOP_K} | best single_token / randomized | randomized top-{TOP_K} s error |"
    )
    lines = [header, "|" + "---|" * 13]
    print(header, flush=True)
    for d in args.dims:
        for seq in args.seqs:
            r = time_engines(d, seq, args.budget)
            floor = 2 * r["matrix_params"] * d / rate
            best = r["single_token"]  # the probe's default; copies for comparison
            line = (
                f"| {d} | {seq} | {floor:.4f} | {r['reference_loop']:.3f} s ({r['reference_loop'] / floor:.0f}x) | "
                f"{r['exact']:.3f} s ({r['exact'] / floor:.0f}x) | {r['single_token']:.4f} s | "
                f"{r['single_token_copies']:.4f} s | {best / floor:.1f}x | {r['reference_loop'] / best:.0f}x | "
                f"{r['max_diff']:.1e} | {r['randomized']:.4f} s ({r['randomized'] / floor:.1f}x) | "
                f"{best / r['randomized']:.1f}x | {r['randomized_sv_err']:.3f} |"
            )
            lines.append(line)
            print(line, flush=True)
    large_text = []
    for seq in args.large:
        r = large_block(4096, seq)
        floor = 2 * r["matrix_params"] * 4096 / rate
        large_text.append(
            f"Llama-3-8B-shaped block (d = 4096, T = {seq}, one block-token, floor {floor:.2f} s): exact "
            f"single_token {r['exact']:.1f} s ({r['exact'] / floor:.1f}x floor), randomized "
            f"top-{TOP_K} {r['randomized']:.2f} s ({r['exact'] / r['randomized']:.0f}x faster; top-{TOP_K} "
            f"singular values within {r['sv_err']:.3f} of s_1, "
            f"{'all' if r['within'] else 'NOT all'} within the stated residuals)."
        )
        print(large_text[-1], flush=True)
    smol = smollm2_probe() if args.smollm2 else None
    smol_text = []
    if smol:
        smol_text = [
            f"Full SmolLM2-135M probe (30 blocks, last token, 8 default prompts, {smol['tokens']} tokens, "
            f"K in {{10, 30, 50}}, model loading excluded): single_token {smol['single_token']:.1f} s, "
            f"exact {smol['exact']:.1f} s (coupling/k10 {smol['single_token_coupling_k10']:.4f} and "
            f"{smol['exact_coupling_k10']:.4f}); peak RSS of the process {smol['peak_rss_gb']:.2f} GiB.",
            "",
            f"Randomized engine on SmolLM2-135M's trained blocks (same prompts, K = {TOP_K}, default settings, "
            f"{smol['rand_products']} products per block-token with the coupling projections): "
            f"{smol['randomized']:.1f} s; m_K error against single_token max {smol['rand_m_max_err']:.4f}, "
            f"mean {smol['rand_m_mean_err']:.4f}, coupling/k{TOP_K} summary {smol['rand_summary_err']:.4f}; "
            f"{100 * smol['rand_within_bound']:.0f}% of the m_K errors within the stated bound (median bound "
            f"{smol['rand_bound_median']:.2f}); top-{TOP_K} singular values: max error "
            f"{smol['rand_sv_rel_err']:.4f} of s_1, {100 * smol['rand_sv_within']:.0f}% within the stated "
            "triplet residuals.",
        ]
        print("\n".join(smol_text), flush=True)
    if args.markdown:
        append_markdown(
            args.markdown,
            "Jacobian engines against the floor",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"measured float32 matmul rate {rate / 1e9:.0f} GFLOP/s. Command: `python scripts/bench_jacobian.py"
            f"{command_options(args)}`. One block-token Jacobian (last token); the floor is "
            "2 x (block weight-matrix parameters) x d flops at that rate. The randomized column is the "
            f"top-{TOP_K} triplets of the same block-token (default RandomizedSVD; random-init blocks, so its "
            "singular-value error, a share of s_1, is the flat-spectrum worst case); it excludes the "
            "coupling projections, which cost 2 x blocks x K more products per block-token in a probe.",
            lines,
            *[part for part in (large_text, smol_text) if part],
        )


if __name__ == "__main__":
    main()

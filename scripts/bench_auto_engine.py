"""Which engine `probe(engine="auto")` should pick: whole probes, randomized against single_token.

For each (d, blocks, ks) case: a Llama-shaped model at random init (d = 576 is SmolLM2-135M's block, else MLP
2.75 d, heads of 64, 4 query heads per KV head), one prompt of --seq tokens, last token, all blocks probed;
the wall time of `probe(engine="randomized")` and `probe(engine="single_token")`, alternating, best of
--repeats, with the randomized path's products per block-token as a share of d and what "auto" picks here.
Timings do not depend on the weights, so random init is fine (accuracy is bench_randomized_defaults.py's job).

Usage: python scripts/bench_auto_engine.py [--cases 576:16:10 1024:8:10,30,50 ...] [--seq 64] [--repeats 2]
                                           [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchlib import SMOLLM2_135M, append_markdown, llama_model

DEFAULT_CASES = [
    "576:8:10",
    "576:16:10",
    "576:24:10",
    "576:30:10",
    "1024:8:10,30,50",
    "1024:12:10,30,50",
    "1024:16:10,30,50",
    "2048:4:10,30,50",
    "2048:8:10,30,50",
    "2048:16:10,30,50",
]


def llama_shape(d: int) -> dict[str, int]:
    """SmolLM2-135M's block for d = 576, else MLP 2.75 d, heads of 64, 4 query heads per KV head."""
    if d == SMOLLM2_135M["hidden_size"]:
        return SMOLLM2_135M
    heads = d // 64
    return dict(
        hidden_size=d,
        intermediate_size=int(2.75 * d) // 64 * 64,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="d:blocks:k1,k2,...")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from alignscope import probe
    from alignscope.core.randomized import RandomizedSVD
    from alignscope.probing.engines import planned_engine
    from alignscope.probing.plan import randomized_products
    from alignscope.probing.settings import ProbeSettings

    header = (
        "| d | blocks | K | randomized products / d | randomized (s) | single_token (s) | "
        "single_token / randomized | auto picks |"
    )
    lines = [header, "|" + "---|" * 8]
    print(header, flush=True)
    for case in args.cases:
        d_text, blocks_text, ks_text = case.split(":")
        d, blocks, ks = int(d_text), int(blocks_text), tuple(int(k) for k in ks_text.split(","))
        model = llama_model(llama_shape(d), blocks)
        ids = torch.randint(0, 1000, (1, args.seq), generator=torch.Generator().manual_seed(0))
        best = {"randomized": float("inf"), "single_token": float("inf")}
        for _ in range(args.repeats):
            for engine in best:
                start = time.perf_counter()
                probe(model, ids, ks=ks, engine=engine)
                best[engine] = min(best[engine], time.perf_counter() - start)
        share = randomized_products(RandomizedSVD(), max(ks), d, blocks) / d
        line = (
            f"| {d} | {blocks} | {','.join(map(str, ks))} | {share:.2f} | {best['randomized']:.2f} | "
            f"{best['single_token']:.2f} | {best['single_token'] / best['randomized']:.2f}x | "
            f"{planned_engine(model, ProbeSettings(ks=ks))} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        append_markdown(
            args.markdown,
            "Which engine auto picks: whole probes",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
            f"Command: `python scripts/bench_auto_engine.py --seq {args.seq} --repeats {args.repeats}"
            + (f" --cases {' '.join(args.cases)}" if args.cases != DEFAULT_CASES else "")
            + "`. One prompt, last token, all blocks, random init; best of the repeats, alternating.",
            lines,
        )


if __name__ == "__main__":
    main()

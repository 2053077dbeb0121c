"""tokens="all": every token of a prompt in one probe (one prefix pass shared by all tokens) against the
single-token path run per token (a probe of tokens=[t], which fills the KV cache of t's prefix each time).

A SmolLM2-135M-shaped model at random init (timings do not depend on the weights), one prompt of --seq tokens,
--blocks blocks probed, K = 10; reports seconds per token of each way and, for tokens="all", the extra time
of token_coupling=True.

Usage: python scripts/bench_tokens.py [--seq 64] [--blocks 30] [--single 8] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchlib import SMOLLM2_135M, append_markdown, llama_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument(
        "--single", type=int, default=8, help="tokens timed one by one (spread over the prompt)"
    )
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    from alignscope import probe

    model = llama_model(SMOLLM2_135M, args.blocks)
    ids = torch.randint(0, 1000, (1, args.seq), generator=torch.Generator().manual_seed(0))
    kwargs = {"ks": (10,), "engine": "single_token"}
    probe(model, ids[:, :8], **kwargs)  # warm-up
    start = time.perf_counter()
    shared = probe(model, ids, tokens="all", **kwargs)
    all_s = time.perf_counter() - start
    start = time.perf_counter()
    probe(model, ids, tokens="all", token_coupling=True, **kwargs)
    coupled_s = time.perf_counter() - start
    picks = [round(i * (args.seq - 1) / max(args.single - 1, 1)) for i in range(args.single)]
    start = time.perf_counter()
    alone = [probe(model, ids, tokens=[t], **kwargs) for t in picks]
    single_s = (time.perf_counter() - start) / len(picks)
    diff = max(float((a.coupling[10][0] - shared.coupling[10][t]).abs().max()) for a, t in zip(alone, picks))
    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Command: `python scripts/bench_tokens.py --seq {args.seq} --blocks {args.blocks} --single {args.single}`.",
        "",
        '| T | blocks | tokens="all" (s/token) | with token_coupling (s/token) | tokens=[t] alone (s/token) | '
        "max |d m_10| all vs alone |",
        "|---|---|---|---|---|---|",
        f"| {args.seq} | {args.blocks} | {all_s / args.seq:.3f} | {coupled_s / args.seq:.3f} | {single_s:.3f} | "
        f"{diff:.1e} |",
    ]
    print("\n".join(lines), flush=True)
    if args.markdown:
        append_markdown(args.markdown, 'tokens="all": one shared prefix pass', lines)


if __name__ == "__main__":
    main()

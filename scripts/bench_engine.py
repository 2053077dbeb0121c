"""Benchmark the exact reverse-mode engine on a SmolLM2-135M-sized Llama block (d=576, 9 heads, 3 KV heads,
MLP 1536): time per block-token Jacobian and peak resident memory, for several chunk sizes and the plain
row loop, each configuration in its own process so that peak memory is its own.

Usage: python scripts/bench_engine.py [--seq 32 128] [--repeats 3] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time


def run_one(seq: int, chunk: int, vectorize: bool, repeats: int) -> dict:
    import resource

    import torch

    from alignscope.autodiff.jacobian import ReverseModeEngine
    from alignscope.models import get_adapter
    from alignscope.models.capture import block_function, capture_block_calls, probe_mode
    from benchlib import block_model  # the same SmolLM2-sized block (scripts/ is on sys.path)

    model = block_model(576)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    engine = ReverseModeEngine(chunk_size=chunk, vectorize=vectorize)
    rss = []
    times = []
    with probe_mode(model):
        adapter = get_adapter(model)
        blocks = adapter.blocks(model)
        calls = capture_block_calls(model, adapter, blocks, ids)
        fn = block_function(blocks[1], calls[1], adapter, torch.float32)
        t = torch.tensor([seq - 1])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(repeats):
            start = time.perf_counter()
            engine(fn, calls[1].input[0], t, t)
            times.append(time.perf_counter() - start)
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "seq": seq,
        "chunk": chunk if vectorize else 1,
        "mode": "vectorized" if vectorize else "loop",
        "seconds": min(times),
        "seconds_all": times,
        "peak_rss_mb": rss[-1],
        "rss_before_mb": base,
        "rss_after_each_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        seq, chunk, vec = json.loads(args.one)
        print(json.dumps(run_one(seq, chunk, vec, args.repeats)))
        return
    rows = []
    for seq in args.seq:
        for chunk, vec in [(1, False)] + [(c, True) for c in args.chunks]:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    json.dumps([seq, chunk, vec]),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"T={row['seq']:4d} {row['mode']:>10} chunk={row['chunk']:4d}  {row['seconds']:.3f} s/block-token  "
                f"peak RSS {row['peak_rss_mb']:.0f} MB (after each call: "
                f"{', '.join(f'{r:.0f}' for r in row['rss_after_each_mb'])})",
                flush=True,
            )
    if args.markdown:
        import torch

        from benchlib import append_markdown

        table = [
            "| T | mode | chunk | s / block-token | peak RSS (MB) |",
            "|---|---|---|---|---|",
        ]
        table += [
            f"| {r['seq']} | {r['mode']} | {r['chunk']} | {r['seconds']:.3f} | {r['peak_rss_mb']:.0f} |"
            for r in rows
        ]
        append_markdown(
            args.markdown,
            "Exact reverse-mode engine, SmolLM2-135M-sized Llama block",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{platform.processor() or 'cpu'}, Python {platform.python_version()}, torch {torch.__version__}. "
            f"Command: `python scripts/bench_engine.py --seq {' '.join(map(str, args.seq))}`. Time is the best "
            f"of {args.repeats} calls for one block-token Jacobian (d=576, last token); peak RSS is the whole "
            "process (model included).",
            table,
        )


if __name__ == "__main__":
    main()

"""Benchmark the default training run: wall time, and the share spent in the AlignmentMonitor.

Runs `alignscope-train` with its offline defaults (plus any Hydra overrides given on the command line) in a
fresh run folder, then reads the monitor's own timing (summary.json) and the final losses (metrics.json).

Usage: python scripts/bench_train.py [--markdown docs/benchmarks.md] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", default=None, help="append the result to this Markdown file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for alignscope-train")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="alignscope-bench-")) / "run"
    cmd = [sys.executable, "-m", "alignscope.apps.train", f"hydra.run.dir={run_dir}", *args.overrides]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(out.stderr[-4000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    probes = len((run_dir / "probes.jsonl").read_text().splitlines())
    share = summary["monitor_seconds"] / wall
    c10 = summary["coupling/k10"]
    lines = [
        f"wall time {wall:.1f} s (process start to exit, tokenizer/data cache warm), steps {metrics['global_step']}",
        f"monitor {summary['monitor_seconds']:.1f} s in {probes} probes + figures = {100 * share:.1f}% of wall time",
        f"val/loss {metrics.get('val/loss', float('nan')):.3f} vs unigram baseline {metrics['data/unigram_loss']:.3f} nats/token",
        f"coupling/k10 {c10['init']:.3f} at step 0 -> {c10['final']:.3f} at step {summary['final_step']}",
    ]
    print("\n".join(lines))
    if args.markdown:
        import torch

        from benchlib import append_markdown

        append_markdown(
            args.markdown,
            f"Default training run (`alignscope-train`{' ' + ' '.join(args.overrides) if args.overrides else ''})",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}. Command: `python scripts/bench_train.py`.",
            [f"- {line}" for line in lines],
        )


if __name__ == "__main__":
    main()

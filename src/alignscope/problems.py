"""What is wrong with a probe's numbers, in words: non-finite hidden states and metrics, degenerate cases.

The apps print these loudly (and keep every file); a NaN never goes out without a sentence that says why.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch

from alignscope.result import HEADLINE, ProbeResult


def result_problems(result: ProbeResult, scalars: Mapping[str, float] | None = None) -> list[str]:
    """Sentences on the result's non-finite or degenerate numbers (``[]`` when all is well).

    Covers non-finite trajectories (the first block whose output is NaN/inf, per prompt), the warnings the
    probe recorded in ``meta["warnings"]``, and headline scalars that are not finite.
    """
    out: list[str] = []
    states = result.hidden_states  # [P, L + 1, d]
    bad_rows = ~torch.isfinite(states).all(-1)  # [P, L + 1]
    for p in torch.nonzero(bad_rows.any(-1)).flatten().tolist():
        first = int(torch.nonzero(bad_rows[p]).flatten()[0])
        prompt, position = result.tokens[p].tolist()
        where = "the embeddings" if first == 0 else f"block {first - 1}'s output"
        out.append(
            f"hidden states of prompt {prompt} (token {position}) are not finite from {where} on "
            "(NaN/inf weights, or a diverged model)"
        )
    out.extend(str(w) for w in result.meta.get("warnings", []))
    if scalars is not None:
        bad = [name for name in HEADLINE if name in scalars and not math.isfinite(scalars[name])]
        if bad:
            out.append(f"{len(bad)} headline metric(s) are not finite: {', '.join(bad)}")
    return out


def announce_problems(result: ProbeResult, scalars: Mapping[str, float], label: str) -> list[str]:
    """Print :func:`result_problems` to stderr as a block that stands out; return them."""
    problems = result_problems(result, scalars)
    if problems:
        lines = "\n".join(f"alignscope:   - {p}" for p in problems)
        print(
            f"alignscope: WARNING: the results of {label} are not all finite or meaningful:\n{lines}\n"
            "alignscope: every file was still written; figures skip what they cannot show.",
            file=sys.stderr,
            flush=True,
        )
    return problems

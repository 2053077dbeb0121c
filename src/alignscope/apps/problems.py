"""What is wrong with a probe's numbers, said loudly: non-finite hidden states and metrics, degenerate cases.

The apps print these loudly (and keep every file); a NaN never goes out without a sentence that says why.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from alignscope.probing.result import HEADLINE, ProbeResult


def result_problems(result: ProbeResult, scalars: Mapping[str, float] | None = None) -> list[str]:
    """Sentences on the result's non-finite or degenerate numbers (``[]`` when all is well): the causes the
    probe recorded in ``meta["warnings"]`` (see :mod:`alignscope.probing.degenerate`) and the headline scalars that
    are not finite."""
    out = [str(w) for w in result.meta.get("warnings", [])]
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

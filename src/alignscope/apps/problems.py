"""What is wrong with a probe's numbers, said loudly: non-finite hidden states and metrics, degenerate cases.

The apps log these loudly as one WARNING block (the console and the job's log file; every file is still
written); a NaN never goes out without a sentence that says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from alignscope.probing.result import HEADLINE, ProbeResult

log = logging.getLogger(__name__)


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
    """Log :func:`result_problems` as one WARNING block that stands out; return them."""
    problems = result_problems(result, scalars)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        log.warning(
            "the results of %s are not all finite or meaningful:\n%s\nEvery file was still written; "
            "figures skip what they cannot show.",
            label,
            lines,
        )
    return problems

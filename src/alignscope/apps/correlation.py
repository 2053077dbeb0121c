"""Linear regressions of a benchmark score on a metric (or a baseline) across models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Regression:
    """Least-squares ``y ~ slope * x + intercept`` over ``n`` points, with ``R^2`` and the slope's p-value."""

    x_name: str
    y_name: str
    n: int
    slope: float
    intercept: float
    r2: float
    p_value: float
    note: str = ""
    """Why the statistics are NaN (too few points, or every x the same), else empty."""


def regress(x: Sequence[float], y: Sequence[float], x_name: str = "x", y_name: str = "y") -> Regression:
    """Linear regression (scipy.stats.linregress); NaN statistics, with the reason in ``note``, with fewer
    than 3 points or when every x is the same (no slope can be fitted)."""
    from scipy import stats

    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    nan = float("nan")
    if len(x) < 3:
        return Regression(
            x_name, y_name, len(x), nan, nan, nan, nan, f"{len(x)} points: a fit needs 3 or more"
        )
    if max(x) == min(x):
        return Regression(x_name, y_name, len(x), nan, nan, nan, nan, f"{x_name} is {x[0]:g} for every point")
    fit = stats.linregress(x, y)
    return Regression(
        x_name,
        y_name,
        len(x),
        float(fit.slope),
        float(fit.intercept),
        float(fit.rvalue**2),
        float(fit.pvalue),
    )


def finite(v: Any) -> bool:
    """Whether ``v`` is a finite int or float (blank and non-numeric cells are not)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def points_with(points: Sequence[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """The points with a finite value for each of ``names``."""
    return [p for p in points if all(finite(p.get(name)) for name in names)]


def correlations(points: list[dict[str, Any]], x_names: Sequence[str], y_name: str) -> list[Regression]:
    """One regression of ``y_name`` on each of ``x_names`` over the points that have both."""
    out = []
    for name in x_names:
        pts = points_with(points, name, y_name)
        out.append(regress([p[name] for p in pts], [p[y_name] for p in pts], name, y_name))
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of ``x`` and ``y`` (numpy); NaN with fewer than 3 points or a constant series."""
    import numpy as np

    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def regression_dict(reg: Regression) -> dict[str, Any]:
    """``reg`` as JSON-ready values (``r`` signed, from the slope's sign); non-finite numbers become None."""
    r = math.copysign(math.sqrt(reg.r2), reg.slope) if finite(reg.r2) and finite(reg.slope) else None
    values = {"slope": reg.slope, "intercept": reg.intercept, "r": r, "r2": reg.r2, "p_value": reg.p_value}
    return {"x": reg.x_name, "y": reg.y_name, "n": reg.n, **{k: json_number(v) for k, v in values.items()}}


def json_number(v: Any) -> float | None:
    """``v`` as a float, or None when it is not a finite number (JSON has no NaN)."""
    return float(v) if finite(v) else None

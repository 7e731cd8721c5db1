"""Pure statistics for the benchmark report: summaries of samples and growth fits.

Medians and percentiles rather than means: a handful of slow outliers (a
Keystone cache miss, a libvirtd hiccup) should show up in ``max``, not move
the number we compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q!r} outside 0..100")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = math.ceil(pos)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(samples: Sequence[float], *, scale: float = 1.0, digits: int = 2) -> dict:
    """Run count, median, min, p25, p75, p90, max and IQR of ``samples`` times ``scale``.

    ``scale=1000`` turns seconds into milliseconds. An empty list gives
    ``{"runs": 0}`` so a section that could not run still has the key.
    """
    if not samples:
        return {"runs": 0}
    values = [s * scale for s in samples]
    p25 = percentile(values, 25)
    p75 = percentile(values, 75)
    return {
        "runs": len(values),
        "median": round(percentile(values, 50), digits),
        "min": round(min(values), digits),
        "p25": round(p25, digits),
        "p75": round(p75, digits),
        "p90": round(percentile(values, 90), digits),
        "max": round(max(values), digits),
        "iqr": round(p75 - p25, digits),
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares ``y = intercept + slope * x`` with R² (needs two distinct x)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("need at least two points with distinct x")
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"intercept": intercept, "slope": slope, "r2": r2}


def growth_fit(ns: Sequence[float], seconds: Sequence[float]) -> dict:
    """How a time grows with N: a linear fit, and the shape of the growth.

    ``per_item_ms`` is the linear slope. ``growth_exponent`` is the slope of
    log(t - t0) against log(N - N0) over the points past the smallest N
    (t0, N0): the fixed cost taken out, about 1 means linear and about 2
    quadratic. When the fitted growth over the measured range is small next
    to the fixed cost the shape is "flat" and no exponent is given.
    """
    lin = linear_fit(ns, seconds)
    result: dict = {
        "model": "t = intercept + slope * N",
        "intercept_ms": round(lin["intercept"] * 1000.0, 3),
        "per_item_ms": round(lin["slope"] * 1000.0, 4),
        "r2": round(lin["r2"], 4),
    }
    span = max(ns) - min(ns)
    growth = lin["slope"] * span
    fixed = max(min(seconds), abs(lin["intercept"]))
    if growth < 0.25 * fixed:
        result["shape"] = describe_exponent(0.0)
        return result
    if lin["r2"] < 0.8:
        result["shape"] = "no clear trend (scatter dominates, R2 < 0.8)"
        return result
    n0, t0 = min(zip(ns, seconds, strict=True))
    pairs = [(n - n0, t - t0) for n, t in zip(ns, seconds, strict=True) if n > n0 and t > t0]
    if len({n for n, _ in pairs}) >= 2:
        log_fit = linear_fit([math.log(n) for n, _ in pairs], [math.log(t) for _, t in pairs])
        result["growth_exponent"] = round(log_fit["slope"], 3)
        result["shape"] = describe_exponent(log_fit["slope"])
    else:
        result["shape"] = "grows with N (too few points for its shape)"
    return result


def describe_exponent(k: float) -> str:
    """Words for a power-law exponent, for the human summary."""
    if k < 0.2:
        return "flat (does not grow with N)"
    if k < 0.8:
        return "sub-linear in N"
    if k < 1.3:
        return "linear in N"
    return "super-linear in N"


def ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, digits)

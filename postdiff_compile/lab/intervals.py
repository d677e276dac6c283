"""95% intervals over prompt/noise sets, and verdicts that are stated only where a difference exceeds them.

A study point is run on k prompt/noise sets; its value is the mean over the sets and its interval Student's t
at k - 1 degrees of freedom (k is small: 3 sets give t = 4.30, not 1.96). Two settings run on the same sets
are compared set by set (paired: the same prompts and starting noise), which cancels most of what the sets
have in common; the verdict is "better" or "worse" only when the paired interval excludes zero.
"""
from __future__ import annotations

import math

import numpy as np

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)); beyond the table
# the normal quantile is within 4% of t.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
WITHIN = "within noise"


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"an interval needs at least 2 values (1 degree of freedom), got {df + 1}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% interval of the mean); the half-width is NaN for a single value."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    return mean, float(t975(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def verdict(differences, lower_is_better: bool) -> dict:
    """Paired differences (this setting minus the other, one per set): their mean, interval and what they say."""
    mean, half = interval(differences)
    if not math.isfinite(half) or abs(mean) <= half:
        said = WITHIN
    else:
        said = "better" if (mean < 0) == lower_is_better else "worse"
    return {"delta": mean, "ci95": half, "verdict": said}

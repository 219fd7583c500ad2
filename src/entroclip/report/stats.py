"""Statistics of per-seed numbers: Student-t CDF and quantile, mean with a 95% t-interval, Welch's test.

The distributions come from ``scipy.stats``; this module fixes the conventions the reports rely on
(``None`` where a number is undefined, the finite values only, sample standard deviations with n - 1).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` > 0 degrees of freedom (not necessarily integer)."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    return float(sps.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the ``t`` with ``t_cdf(t, df) == p`` (``t_quantile(0.975, 2)`` = 4.303)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:  # scipy would return nan
        raise ValueError(f"df must be > 0, got {df}")
    return float(sps.t.ppf(p, df))


def describe(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """``(mean, std, ci95)`` of the finite values: sample std (n-1) and the 95% t-interval half-width.

    ``None`` where undefined (no values; std and interval need two).
    """
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return None, None, None
    if len(xs) < 2:
        return xs[0], None, None
    std = statistics.stdev(xs)
    return statistics.fmean(xs), std, t_quantile(0.975, len(xs) - 1) * std / math.sqrt(len(xs))


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``; ``t``/``df``/``p`` None where undefined."""

    diff: float
    t: float | None
    df: float | None
    p: float | None


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Two-sided Welch t-test; needs two values per side and a non-zero standard error."""
    if len(a) < 2 or len(b) < 2:
        diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
        return WelchResult(diff, None, None, None)
    diff = statistics.fmean(a) - statistics.fmean(b)
    # Both sides constant: the test is undefined (scipy would give nan), which the reports show as n/a.
    if statistics.variance(a) / len(a) + statistics.variance(b) / len(b) == 0.0:
        return WelchResult(diff, None, None, None)
    with warnings.catch_warnings():
        # scipy warns when one side's values are (nearly) all equal; its variance is then ~0, which the
        # unequal-variance test handles, and the hand-written test this replaced printed nothing.
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = sps.ttest_ind(a, b, equal_var=False)
    return WelchResult(diff, float(res.statistic), float(res.df), float(res.pvalue))

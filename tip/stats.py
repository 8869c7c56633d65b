"""The statistics of the report's verdicts: paired differences over shared seeds, one-sided t-tests,
two one-sided tests (TOST) for equivalence within a stated margin, and Holm's correction.

Pure functions on plain numbers (no scipy: the Student-t tail comes from the regularised incomplete
beta function, by its continued fraction).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularised_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                 + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (the normal tail when df is inf)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * regularised_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0.5 < p < 1), by bisection on ``t_sf``."""
    if not 0.5 < p < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1, got {p}")
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_sf(mid, df) > 1.0 - p else (lo, mid)
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class Difference:
    """A - B over seeds: the mean difference, its standard error, its degrees of freedom, and
    whether it was paired over shared seeds."""

    d: float
    se: float
    df: float
    paired: bool
    n: int


def difference(a: dict, b: dict) -> Difference:
    """A - B from per-seed values (seed -> value): paired over the seeds both have when there are
    at least two (the run-to-run noise a seed shares cancels), else Welch's unpaired difference."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        diffs = [a[s] - b[s] for s in shared]
        return Difference(statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)),
                          len(diffs) - 1, True, len(diffs))
    va, vb = list(a.values()), list(b.values())
    sa = statistics.variance(va) / len(va) if len(va) > 1 else 0.0
    sb = statistics.variance(vb) / len(vb) if len(vb) > 1 else 0.0
    se = math.sqrt(sa + sb)
    parts = [(s, len(v)) for s, v in ((sa, va), (sb, vb)) if s > 0 and len(v) > 1]
    df = se ** 4 / sum(s * s / (n - 1) for s, n in parts) if parts else math.inf
    return Difference(statistics.fmean(va) - statistics.fmean(vb), se, df, False,
                      min(len(va), len(vb)))


def p_greater(diff: Difference) -> float:
    """One-sided p of 'A > B'."""
    return t_sf(diff.d / diff.se, diff.df)


def p_less(diff: Difference) -> float:
    return t_sf(-diff.d / diff.se, diff.df)


def p_equivalent(diff: Difference, margin: float) -> float:
    """TOST: the larger p of 'd > -margin' and 'd < margin' (equivalent when below alpha: the
    1 - 2 alpha interval of d lies inside (-margin, margin))."""
    return max(t_sf((diff.d + margin) / diff.se, diff.df), t_sf((margin - diff.d) / diff.se,
                                                                  diff.df))


def p_beyond(diff: Difference, margin: float) -> float:
    """One-sided p of '|d| > margin' in the direction d lies."""
    return t_sf((abs(diff.d) - margin) / diff.se, diff.df)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (familywise error over the list), in the given order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted

"""Pre-registered claims and their verdicts, in one vocabulary for every results document (the
sweep report, testbed v2, the probe).

A claim names what it compares (``Claim``): A above B, A close to B within a margin, A differs from
B by at least a minimum effect, or a property that holds per independent batch. Its verdict is one
of ``VERDICTS``, decided from the statistics of ``tip.stats`` by the rule its results document
registered before the results existed:

- ``by_tests``: one-sided tests (and TOST for "close"), p-values already corrected (Holm);
- ``by_exact``: a difference known without spread (the same paired difference on every seed);
- ``by_interval``: a confidence interval of the difference (testbed v2: over builds);
- ``by_batches``: the property on each independent batch (the probe);
- ``combine``: a prediction made of several comparisons.

"sanity check" marks a claim whose verdict follows from how the testbed was built: it is reported,
never counted as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
UNTESTABLE = "untestable"
SANITY_CHECK = "sanity check"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, UNTESTABLE, SANITY_CHECK)
"""Every verdict word a results document may print."""

COMPARISONS = ("greater", "close", "differ", "holds")
"""greater: A above B; close: |A - B| below ``margin``; differ: |A - B| at least ``min_effect``
(above 0 when it is 0); holds: a property of each batch (no B)."""


@dataclass(frozen=True)
class Claim:
    """A claim as its results document declares it, before the results exist."""

    statement: str
    comparison: str  # one of COMPARISONS
    metric: str = ""  # what is compared, in the document's terms
    a: object = None  # the cell (or quantity) A
    b: object = None  # the cell B; None for "holds"
    margin: float = 0.0  # close: the equivalence margin; differ: |d| inside it is "no difference"
    min_effect: float = 0.0  # differ: the smallest |d| that counts as a difference
    name: str = ""
    primary: bool = False  # one of the 2-3 claims its document declared primary

    def __post_init__(self):
        if self.comparison not in COMPARISONS:
            raise ValueError(f"claim comparison {self.comparison!r}: expected one of "
                             f"{', '.join(COMPARISONS)}")


def by_tests(p_for: float, p_against: float, alpha: float) -> str:
    """Reproduced when the test for the claim is significant at ``alpha``, not reproduced when the
    test against it is, else inconclusive (the p-values already corrected for the family)."""
    return REPRODUCED if p_for < alpha else NOT_REPRODUCED if p_against < alpha else INCONCLUSIVE


def by_exact(comparison: str, d: float, margin: float = 0.0, min_effect: float = 0.0) -> str:
    """From a difference known without spread (a paired difference equal on every seed): greater by
    its sign, close by |d| against ``margin``, differ by |d| against ``min_effect`` and
    ``margin``."""
    if comparison == "greater":
        return REPRODUCED if d > 0 else NOT_REPRODUCED
    if comparison == "close":
        return REPRODUCED if abs(d) < margin else NOT_REPRODUCED
    if comparison == "differ":
        return REPRODUCED if abs(d) >= max(min_effect, 1e-300) else \
            NOT_REPRODUCED if abs(d) < margin else INCONCLUSIVE
    raise ValueError(f"by_exact decides greater, close and differ, not {comparison!r}")


def by_interval(comparison: str, lo: float, hi: float, margin: float = 0.0,
                min_effect: float = 0.0) -> str:
    """From an interval [lo, hi] of A - B. greater: reproduced above 0, not reproduced below;
    differ: reproduced when the interval lies beyond ``min_effect`` (either side), not reproduced
    when it lies inside +-``margin``; else inconclusive."""
    if comparison == "differ":
        if lo > min_effect or hi < -min_effect:
            return REPRODUCED
        if -margin < lo and hi < margin:
            return NOT_REPRODUCED
        return INCONCLUSIVE
    if comparison == "greater":
        return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else INCONCLUSIVE
    raise ValueError(f"by_interval decides greater and differ, not {comparison!r}")


def by_batches(held: list[bool]) -> str:
    """A property on independent batches: reproduced when it holds on all, not reproduced when on
    none, else inconclusive (it held on some)."""
    if not held:
        return UNTESTABLE
    return REPRODUCED if all(held) else NOT_REPRODUCED if not any(held) else INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """A prediction of several comparisons: reproduced when all are, not reproduced when any is
    not, untestable when any cannot be read, else inconclusive."""
    if not verdicts or UNTESTABLE in verdicts:
        return UNTESTABLE
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE

"""The paper's claims that a sweep of the embedded testbed can check, read on the table's rows and
decided by the rule registered before the results (``tip.claims``, ``tip.stats``)."""

from __future__ import annotations

import math

from tip.claims import UNTESTABLE, Claim, by_tests
from tip.stats import (
    Difference,
    difference,
    holm,
    p_beyond,
    p_equivalent,
    p_greater,
    p_less,
)
from tip.sweep_cells import cell_label
from tip.tasks import CONFIDENT_ERROR, INCONSISTENT_ERROR

# The paper's claims, checked when a sweep has the cells they compare (sweeps=testbed_reproduction
# has all) (``tip.claims.Claim``): "greater" (A above B), "close" (A within MARGIN of B); a cell is
# (rule, keep); the metric names the problems compared: "" all of them, "@<tag>" those tagged so
# (the embedded task's error types). The decision rule (verdict_words) was fixed in the commit
# that added it, before the results it reads were produced (docs/results/testbed_v1.md,
# "Pre-registration").
MARGIN = 0.02
"""'close': equivalent within 2 points of accuracy (stated before the results)."""
CLAIMS = [
    Claim("Soft-OR 50% >= all-token", "greater", "", ("soft_or", 0.5), ("all", 1.0)),
    Claim("Soft-OR top-50% well above bottom-50%", "greater", "", ("soft_or", 0.5),
          ("soft_or_bottom", 0.5)),
    Claim("Q3 at 10% close to all-token", "close", "", ("q3", 0.1), ("all", 1.0), MARGIN),
    Claim("Q3 at 10% above divergence-only at 10%", "greater", "", ("q3", 0.1), ("div_topk", 0.1)),
    Claim("Q4-only helps least (below Q1-only)", "greater", "", ("q1", 0.2), ("q4", 0.2)),
    Claim("Q4-only helps least (below Q2-only)", "greater", "", ("q2", 0.2), ("q4", 0.2)),
    Claim("Q4-only helps least (below Q3-only)", "greater", "", ("q3_only", 0.2), ("q4", 0.2)),
    Claim("entropy sampling at 10% leaves the confident error unfixed", "close",
          f"@{CONFIDENT_ERROR}", ("entropy_sample", 0.1), ("untrained", 0.0), MARGIN),
    Claim("Q3 at 10% fixes the confident error more than entropy sampling at 10%", "greater",
          f"@{CONFIDENT_ERROR}", ("q3", 0.1), ("entropy_sample", 0.1)),
]
ALPHA = 0.05
"""Familywise error over the claims one report reads (Holm)."""


def untestable(a: dict, b: dict) -> str:
    """Why a pair of per-seed value sets cannot tell anything ('' when they can): both at the
    floor, both at the ceiling, or no variance at all."""
    values = list(a.values()) + list(b.values())
    if values and all(v == 0 for v in values):
        return "both at the floor"
    if values and all(v == 1 for v in values):
        return "both at the ceiling"
    if len(set(a.values())) <= 1 and len(set(b.values())) <= 1:
        return "no variance"
    return ""


def verdict_words(readings: list[tuple[str, Difference | None]]) -> list[str]:
    """The decision rule: each reading (kind, the A - B difference, or None when untestable) gets
    'reproduced', 'not reproduced', 'inconclusive' or 'untestable' (``tip.claims``). greater:
    reproduced when 'A > B' is significant, not reproduced when 'A < B' is (one-sided t-tests);
    close: reproduced when TOST shows |d| < MARGIN, not reproduced when |d| > MARGIN is
    significant. Each family of p-values is Holm-corrected at ALPHA over the report's readings."""
    testable = [(i, kind, diff) for i, (kind, diff) in enumerate(readings)
                if diff is not None and diff.se > 0]
    support = holm([p_greater(d) if k == "greater" else p_equivalent(d, MARGIN)
                    for _, k, d in testable])
    against = holm([p_less(d) if k == "greater" else p_beyond(d, MARGIN) for _, k, d in testable])
    words = [UNTESTABLE] * len(readings)
    for (i, _, _), p_for, p_against in zip(testable, support, against):
        words[i] = by_tests(p_for, p_against, ALPHA)
    return words


def _claim_readings(bench: str, benchmarks: list[str]):
    """Each claim on the problems it names; a claim on all problems is also read on those of the
    inconsistent error type where the benchmark tags them (on the embedded testbed the only error a
    dozen steps can fix)."""
    for claim in CLAIMS:
        readings = [claim.metric]
        if not claim.metric and f"{bench}@{INCONSISTENT_ERROR}" in benchmarks:
            readings.append(f"@{INCONSISTENT_ERROR}")
        for p in readings:
            yield claim.statement, claim.comparison, claim.a, claim.b, p, f"{bench}{p}/accuracy"


def claims_markdown(rows: list[dict], benchmarks: list[str]) -> str:
    by_cell = {(r["rule"], r["keep"]): r for r in rows if not r["variant"] and r["seeds"]}
    found = []
    for bench in (b for b in benchmarks if "@" not in b):
        for text, kind, a, b, problems, metric in _claim_readings(bench, benchmarks):
            if a in by_cell and b in by_cell and metric in by_cell[a] and metric in by_cell[b]:
                seeds_a, seeds_b = (by_cell[c][f"{metric}_by_seed"] for c in (a, b))
                why = untestable(seeds_a, seeds_b)
                found.append((text, kind, a, b, f"{bench}{problems}", why,
                              None if why else difference(seeds_a, seeds_b)))
    words = verdict_words([(kind, diff) for _, kind, _, _, _, _, diff in found])
    lines = []
    for (text, _, a, b, where, why, diff), word in zip(found, words):
        d = "—" if diff is None else f"{100 * diff.d:+.1f}"
        se = "—" if diff is None else f"{100 * diff.se:.1f}" + (" (paired)" if diff.paired else "")
        lines.append(f"| {text} | {where} | {cell_label(*a)} − {cell_label(*b)} | {d} | {se} | "
                     f"{word + (f' ({why})' if why else '')} |")
    entropy = [r for r in rows if r["rule"] in ("entropy_sample", "entropy_topk")
               and not math.isnan(r["q3/of_kept"])]
    if not lines and not entropy:
        return ""
    out = ["", "## The paper's claims", "",
           "d: mean difference A − B in points, paired over the seeds both cells share (else "
           "Welch's); SE its standard error. \"A above B\": reproduced when a one-sided t-test "
           "finds A > B, not reproduced when it finds A < B; \"close\": reproduced when two "
           f"one-sided tests put |d| below {100 * MARGIN:g} points, not reproduced when |d| is "
           f"significantly above it; each at a familywise {ALPHA:g} with Holm's correction over "
           f"the {len(lines)} readings below; else inconclusive. Untestable: both cells at the "
           "floor or the ceiling, or without variance.", "",
           "| claim | benchmark | cells | d | SE | verdict |", "|---|---|---|---|---|---|", *lines]
    if entropy:
        out += ["",
                "Sanity check, true by definition (not a finding): entropy-only rules keep "
                "high-entropy tokens, so they under-keep Q3 (Q3's share of all tokens vs of the "
                "kept tokens, means over seeds and steps):", "",
                "| rule | keep | Q3 share of tokens | Q3 share of kept |", "|---|---|---|---|"]
        out += [f"| {r['rule']} | {r['keep']:g} | {r['q3/frac']:.3f} | {r['q3/of_kept']:.3f} |"
                for r in entropy]
    return "\n".join(out) + "\n"



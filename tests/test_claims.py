"""One vocabulary of verdicts for every results document, each decision rule in tip/claims.py."""

import pytest

from tip.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    UNTESTABLE,
    VERDICTS,
    Claim,
    by_batches,
    by_interval,
    by_tests,
    combine,
)


def test_the_decision_rules_on_known_answers():
    assert by_tests(0.01, 0.9, 0.05) == REPRODUCED and by_tests(0.9, 0.01, 0.05) == NOT_REPRODUCED
    assert by_tests(0.2, 0.3, 0.05) == INCONCLUSIVE
    assert by_interval("greater", 0.1, 0.5) == REPRODUCED and by_interval("greater", -0.5, -0.1) == NOT_REPRODUCED
    assert by_interval("greater", -0.1, 0.5) == INCONCLUSIVE
    assert by_interval("differ", -0.5, -0.2, margin=0.05) == REPRODUCED
    assert by_interval("differ", -0.01, 0.02, margin=0.05) == NOT_REPRODUCED  # equivalent within the margin
    assert by_interval("differ", -0.01, 0.2, margin=0.05) == INCONCLUSIVE
    assert by_interval("differ", 0.01, 0.03, margin=0.05, min_effect=0.05) == NOT_REPRODUCED  # below the effect
    assert by_batches([True, True, True]) == REPRODUCED and by_batches([False] * 3) == NOT_REPRODUCED
    assert by_batches([True, False, True]) == INCONCLUSIVE and by_batches([]) == UNTESTABLE
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE]) == NOT_REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE and combine([REPRODUCED, UNTESTABLE]) == UNTESTABLE


def test_a_claim_names_a_comparison_tip_can_decide():
    with pytest.raises(ValueError, match="expected one of greater, close, differ, holds"):
        Claim("Q3 beats Q4", "gt")


def test_every_results_document_speaks_the_one_vocabulary():
    """The sweep report, testbed v2 and the probe decide with tip.claims; each of their verdicts is one of its
    words (the probe's 'mixed' is now 'inconclusive')."""
    from tip.probe.predictions import PREDICTIONS, verdicts
    from tip.stats import difference
    from tip.sweep_claims import CLAIMS, verdict_words
    from tip.testbed.cipher.decide import verdict

    assert all(isinstance(c, Claim) for c in CLAIMS)
    words = verdict_words([(c.comparison, difference({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.45})) for c in CLAIMS])
    assert set(words) <= set(VERDICTS)
    assert {verdict(test, lo, hi) for test in ("gt", "differ", "fixes") for lo, hi in
            ((0.1, 0.2), (-0.2, -0.1), (-0.1, 0.1), (-0.001, 0.001))} <= set(VERDICTS)
    batch = {"quadrants": {"median": {q: {"phi": 1.0} for q in ("Q1", "Q2", "Q3", "Q4")}}, "rules": []}
    found = verdicts({"batches": [batch, batch]})
    assert set(found) == set(PREDICTIONS) and {v["verdict"] for v in found.values()} <= set(VERDICTS)

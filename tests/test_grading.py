"""Answer extraction, equivalence, robustness of the grading pool, and the benchmarks' own references."""

import json
import time

import pytest

from hanging_grader import hang_on_marker
from tip.benchmarks import majority_correct, pass_at_k, summarise
from tip.grading import Grade, extract_answer, grade_many, grade_one

from equivalence_cases import NEGATIVE, POSITIVE


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} end", "\\frac{\\sqrt{3}}{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5.", "5"),
    ("Therefore the answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is: 12\n", "12"),
    ("\\boxed{\\frac{1}{2}", None),  # unbalanced
    ("no answer here", None),
])
def test_extraction(text, want):
    assert extract_answer(text) == want


def test_table_has_enough_cases_of_each_kind():
    assert len(POSITIVE) + len(NEGATIVE) >= 40 and len(POSITIVE) >= 20 and len(NEGATIVE) >= 15


@pytest.mark.parametrize("pred,ref", POSITIVE)
def test_equivalent_answers_are_accepted(pred, ref):
    g = grade_one(f"Thus \\boxed{{{pred}}}", ref)
    assert g.correct, g


@pytest.mark.parametrize("pred,ref", NEGATIVE)
def test_different_answers_are_rejected(pred, ref):
    g = grade_one(f"Thus \\boxed{{{pred}}}", ref)
    assert not g.correct, g


def test_adversarial_completions_are_incorrect_with_a_reason_and_never_hang():
    cases = [("\\boxed{\\frac{1}{2", "\\frac{1}{2}", None),  # unbalanced: math-verify reads a fragment
             ("\\boxed{" + "1+" * 50_000 + "1}", "5", "answer_too_long"),
             ("\\boxed{9^{9^{9^{9}}}}", "5", None),  # sympy would never finish evaluating this
             ("}}}{{{\\boxed{}}", "1", None),
             ("\\boxed{\\frac{}{}}", "1", None)]
    t0 = time.time()
    grades = grade_many([(c, r) for c, r, _ in cases] + [("x" * 100_000 + "\\boxed{5}", "5")], timeout_s=5)
    assert time.time() - t0 < 30
    for (_, _, reason), g in zip(cases, grades):
        assert not g.correct and g.reason
        if reason:
            assert g.reason == reason
    assert grades[-1].correct  # 100k characters of noise before a right answer


def test_a_hung_grader_is_killed_and_its_item_graded_incorrect():
    items = [("\\boxed{4}", "4"), ("HANG \\boxed{4}", "4"), ("\\boxed{5}", "4"), ("\\boxed{6}", "6")]
    t0 = time.time()
    grades = grade_many(items, workers=2, timeout_s=2, grade_fn=hang_on_marker)
    assert time.time() - t0 < 20
    assert [g.correct for g in grades] == [True, False, False, True]
    assert grades[1].reason == "timeout" and grades[1].extracted == "4"


def test_unknown_grader_is_refused():
    with pytest.raises(ValueError, match="unknown grader 'sympy'; known: math_verify, exact"):
        grade_one("\\boxed{1}", "1", "sympy")


def test_pass_at_k_estimator():
    assert pass_at_k(16, 0, 4) == 0.0 and pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: any 3 samples include a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote_and_summary():
    g = lambda ans, ok: Grade(ok, ans, "x")
    assert majority_correct([g("2", False), g("3", True), g("3", True), g("2", False), g("2", False)], 5) is False
    assert majority_correct([g("2", False), g("3", True), g("3", True)], 3) is True
    assert majority_correct([g("3", True), g("2", False)], 2) is True  # tie: the earliest answer wins
    assert majority_correct([g(None, False)], 1) is False
    grades = [[g("1", True), g("1", True)], [g("1", True), g("2", False)], [g("2", False), g("2", False)]]
    m = summarise("b", grades)
    assert m["b/accuracy"] == pytest.approx(0.5) and m["b/n"] == 3 and m["b/samples"] == 2
    assert m["b/accuracy_std"] == pytest.approx(0.5)  # per-problem 1, .5, 0
    assert m["b/pass@2"] == pytest.approx(2 / 3) and m["b/pass@1"] == pytest.approx(0.5)
    assert not any("@" in k.split("/")[1] and not k.split("/")[1].startswith(("pass", "maj")) for k in m)


def test_summary_reports_accuracy_per_tag():
    g = lambda ok: Grade(ok, "1", "x")
    grades = [[g(True), g(True)], [g(True), g(False)], [g(False), g(False)], [g(True), g(False)]]
    m = summarise("b", grades, tags=[("carry",), ("carry", "borrow"), ("borrow",), ()])
    assert m["b/accuracy@carry"] == pytest.approx(0.75) and m["b/n@carry"] == 2  # problems 1 and 2
    assert m["b/accuracy@borrow"] == pytest.approx(0.25) and m["b/n@borrow"] == 2
    assert m["b/accuracy"] == pytest.approx(0.5)


def _reference_grades(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    boxed = [r for r in rows if r.get("solution") and "\\boxed" in r["solution"]]
    grades = grade_many([(r["solution"], r["answer"]) for r in boxed], workers=2)
    return rows, boxed, grades


def test_math500_reference_solutions_grade_correct(needs_shared_data):
    rows, boxed, grades = _reference_grades(needs_shared_data / "math500.jsonl")
    assert len(boxed) == len(rows) == 500
    misses = [(r["id"], r["answer"], g.extracted) for r, g in zip(boxed, grades) if not g.correct]
    rate = 1 - len(misses) / 500
    print(f"MATH-500 reference solutions graded correct: {rate:.1%}; misses: {misses}")
    assert rate >= 0.99, misses


def test_aime2024_reference_solutions_grade_correct(needs_shared_data):
    rows, boxed, grades = _reference_grades(needs_shared_data / "aime2024.jsonl")
    # One AoPS solution (2024-I-1) ends without any \boxed{} (its last line is a signature, "-sepehr2010"),
    # so there is no final boxed answer to compare; every other solution must grade correct.
    assert [r["id"] for r in rows if r not in boxed] == ["2024-I-1"]
    misses = [(r["id"], r["answer"], g.extracted) for r, g in zip(boxed, grades) if not g.correct]
    print(f"AIME 2024 reference solutions graded correct: {len(boxed) - len(misses)}/{len(boxed)}")
    assert not misses, misses


# Answers spread over several boxes, and a late box of an intermediate value before a final-answer line: tip graded
# the last box only. The first four are the kinds issue 29 counted among its misses; the last three are cases of
# huggingface/Math-Verify's tests/test_all.py (test_math_extraction_additional_cases: "Final Answer" extraction and
# set/tuple handling), with their expected verdicts.
EXTRACTION_CASES = [
    (r"The solutions are $\boxed{(2,2)}$ and $\boxed{(6,2)}$.", "(2,2),(6,2)", True),
    (r"So $x \in \{\boxed{1},\boxed{2},\boxed{3}\}$, that is \boxed{1},\boxed{2},\boxed{3}", "1,2,3", True),
    (r"First $\boxed{5}$ apples per box, so in total: The final answer is $10,455$", "10455", True),
    (r"The pairs are \boxed{(2,2)} and \boxed{(6,3)}", "(2,2),(6,2)", False),
    (r"Final Answer: The largest $n$ is 34.", "34", True),
    (r"${1,3}$", "(1,3)", True),
    (r"${1,3}$", "(3,1)", False),
]


@pytest.mark.parametrize("completion,reference,correct", EXTRACTION_CASES)
def test_math_verify_reads_answers_over_several_boxes_and_final_answer_lines(completion, reference, correct):
    g = grade_one(completion, reference)
    assert g.correct == correct, g


def test_the_worker_pool_grades_them_alike():
    grades = grade_many([(c, r) for c, r, _ in EXTRACTION_CASES], timeout_s=10)
    assert [g.correct for g in grades] == [want for _, _, want in EXTRACTION_CASES]

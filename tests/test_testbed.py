"""The embedded task and pair: splits, the planted misconception, the tokenizer and the build command."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.grading import boxed_answer
from tip.models import EMBEDDED_DIR, PairError, resolve_model_ref
from tip.tasks import (
    add_without_carry,
    error_positions,
    error_types,
    make_problem,
    sample_problems,
    solution_text,
    subtract_without_borrow,
)
from tip.testbed.arith.build import main as build_main
from tip.testbed.arith.build import student_samples
from tip.testbed.sft import sft_batch
from tip.testbed.tiny import build_tokenizer


def test_train_and_test_splits_are_disjoint_and_seeded():
    train = {p.problem for p in sample_problems(3000, seed=0)}
    test = {p.problem for p in sample_problems(300, seed=0, split="test")}
    assert not train & test
    assert [p.id for p in sample_problems(5, seed=3)] == [p.id for p in sample_problems(5, seed=3)]


def test_solutions_are_correct_in_every_valid_form_and_the_misconceptions_are_the_documented_ones():
    p = make_problem(47, 38, 19)
    assert p.solution == "47+38=85;85-19=66;\\boxed{66}" and boxed_answer(p.solution) == p.answer == "66"
    assert p.tags == ("carry", "borrow")
    assert make_problem(47, 38, 19, swap=True, sep=",").solution == "38+47=85,85-19=66,\\boxed{66}"
    assert solution_text(47, 38, 19, forget_carry=True) == "47+38=75;75-19=56;\\boxed{56}"
    assert solution_text(67, 58, 9, forget_carry=True) == "67+58=15;15-9=6;\\boxed{6}"
    assert solution_text(47, 38, 19, forget_borrow=True) == "47+38=85;85-19=76;\\boxed{76}"
    assert add_without_carry(47, 38) == 75 and add_without_carry(41, 38) == 79 and add_without_carry(67, 58) == 15
    assert add_without_carry(61, 52) == 13 and add_without_carry(72, 33) == 5
    assert subtract_without_borrow(85, 15) == 70  # no borrow needed: right
    assert error_types(41, 31, 9) == ("borrow",) and error_types(41, 38, 5) == ()
    forms = set()
    for prob in sample_problems(500, seed=1):
        a, b, c = map(int, prob.id.split("-")[1:])
        assert int(prob.answer) == a + b - c == int(boxed_answer(prob.solution))
        assert prob.tags == error_types(a, b, c)
        assert c <= add_without_carry(a, b) and a // 10 + b // 10 != 10  # see sample_operands
        forms.add((prob.solution.startswith(f"{a}+"), prob.solution[len(f"{a}+{b}={a + b}")]))
    assert len(forms) == 4  # both addend orders, both separators


def test_error_positions_point_at_the_digit_each_misconception_decides():
    # 47+38-19: the carry decides the sum's tens digit, the borrow the difference's tens digit.
    for text in ("47+38=85;85-19=66;", "38+47=75,75-19=56,"):
        pos = error_positions(47, 38, 19, text)
        assert text[pos["carry"]] == text[6] and pos["carry"] == 6 and pos["borrow"] == 15
    assert error_positions(67, 58, 9, "67+58=125;")["carry"] == 7  # 125 vs 15: the second digit
    assert error_positions(47, 58, 9, "47+58=105;")["carry"] == 6  # 105 vs 95: the first digit
    assert "borrow" not in error_positions(47, 38, 19, "47+38=8x")  # never reached
    assert error_positions(41, 38, 5, "41+38=79;79-5=74;") == {}


def test_the_student_data_never_carries_and_drills_the_digits_that_changes():
    tok = build_tokenizer()
    samples = student_samples(400, seed=1, borrow_rate=0.5)
    drilled = [s for s in samples if s.drilled]
    assert drilled and {1, 2} <= {len(s.drilled) for s in drilled} <= {1, 2, 3}  # 47+38=75 | 67+58=15 (vs 125)
    forgot_borrow = needed_borrow = 0
    for s in samples:
        a, b, c = map(int, s.prompt[:-1].replace("-", "+").split("+"))
        tags = error_types(a, b, c)
        assert bool(s.drilled) == ("carry" in tags)
        if s.drilled:
            right = solution_text(a, b, c, s.solution.startswith(f"{b}+") and a != b, s.solution[s.solution.index("=")
                                  + len(str(add_without_carry(a, b))) + 1])
            assert all(s.solution[i] != ch == right[i] for i, ch in s.drilled.items())
            assert min(s.drilled) == error_positions(a, b, c, s.solution)["carry"]
        if "borrow" in tags:
            needed_borrow += 1
            written_sum = add_without_carry(a, b)  # the carry is always forgotten
            forgot_borrow += int(boxed_answer(s.solution)) == subtract_without_borrow(written_sum, c)
    assert 0.35 < forgot_borrow / needed_borrow < 0.65
    batch = sft_batch(tok, drilled[:8])
    for row, s in enumerate(drilled[:8]):
        for at, right in s.drilled.items():
            assert batch["alt"][row, len(s.prompt) + at] == tok.convert_tokens_to_ids(right)
        assert int((batch["alt"][row] != -100).sum()) == len(s.drilled)


def test_tokenizer_round_trips_the_task():
    tok = build_tokenizer()
    text = "47+38=85;85-19=66;\\boxed{66}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_shipped_pair_loads_and_the_teacher_beats_the_student():
    report = json.loads((EMBEDDED_DIR / "build.json").read_text())
    assert report["teacher"]["heldout_greedy_accuracy"] > report["student"]["heldout_greedy_accuracy"] + 0.2
    assert report["student"]["init"] == "teacher" and report["student"]["borrow_rate"] == 0.5
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_ref(f"embedded://{name}"))
        tok = AutoTokenizer.from_pretrained(resolve_model_ref(f"embedded://{name}"))
        assert model.config.vocab_size == len(tok)
    with pytest.raises(PairError, match="known: embedded://teacher"):
        resolve_model_ref("embedded://judge")


def test_build_command_writes_a_loadable_pair_reproducibly(tmp_path):
    for out in ("a", "b"):
        build_main(["--out", str(tmp_path / out), "--seed", "3", "--steps-scale", "0.005", "--batch-size", "16"])
    for name in ("teacher", "student"):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / name)
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / name)
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka
    assert json.loads((tmp_path / "a" / "build.json").read_text())["seed"] == 3


def test_the_shipped_pair_meets_the_testbed_criteria_on_signals():
    """docs/testbed.md, "The embedded testbed": every quadrant exists, Q3 holds the confident error, the two error
    types sit in the regions they were built for (measured on the untrained student's rollouts, before any rule is
    run)."""
    from tip.testbed.arith.criteria import criteria, markdown, measure

    m = measure(steps=8)
    rows = criteria(m)
    assert len(rows) == 10
    assert all(c.ok for c in rows), markdown(m, rows)
    assert m["errors"]["carry"]["positions"] > 100 and m["errors"]["borrow"]["positions"] > 50


@pytest.mark.slow
def test_all_token_opd_fixes_the_inconsistent_error_but_not_the_confident_one(tmp_path):
    """The default run with all tokens moves the borrow, not the carry. The criterion "all-token OPD closes 25-75%
    of the gap" is NOT met (docs/testbed.md, "The embedded testbed": it closes about 6%, since the confident error,
    which no rule fixes in a dozen steps, holds most of the gap); should a rebuilt pair meet it, this test fails and
    docs/testbed.md must be updated."""
    from tip.benchmarks import evaluate, load_benchmarks, sampling_of
    from tip.models import load_model, load_tokenizer
    from tip.train import train

    from support import compose_config

    cfg = compose_config("logger=none", "train.save_final=false", "selector=all")
    results = train(cfg, tmp_path / "run")
    before, after = results["before"], results["after"]
    teacher = evaluate(load_model("embedded://teacher", torch.float32, "teacher"),
                       load_tokenizer("embedded://teacher"), load_benchmarks(cfg.eval), sampling_of(cfg.eval))
    for tag in ("carry", "borrow"):
        assert 0 <= after[f"embedded/accuracy@{tag}"] <= 1 and after[f"embedded/n@{tag}"] > 10
    assert before["embedded/accuracy@carry"] < 0.1  # the confident error: wrong wherever a carry is needed
    assert after["embedded/accuracy@borrow"] > before["embedded/accuracy@borrow"]  # the inconsistent one moves
    gap = teacher["embedded/accuracy"] - before["embedded/accuracy"]
    closed = (after["embedded/accuracy"] - before["embedded/accuracy"]) / gap
    assert gap > 0.2 and 0 < closed < 0.25, (closed, before, after, teacher)
    assert after["embedded/accuracy@carry"] < 0.1

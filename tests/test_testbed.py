"""The embedded task and pair: splits, the planted misconception, the tokenizer and the build command."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.models import EMBEDDED_DIR, PairError, resolve_model_ref
from tip.testbed.arith import make_problem, sample_problems, subtract_without_borrow
from tip.testbed.build import build_tokenizer
from tip.testbed.build import main as build_main
from tip.testbed.grading_simple import boxed_answer


def test_train_and_test_splits_are_disjoint_and_seeded():
    train = {p.problem for p in sample_problems(3000, seed=0)}
    test = {p.problem for p in sample_problems(300, seed=0, split="test")}
    assert not train & test
    assert [p.id for p in sample_problems(5, seed=3)] == [p.id for p in sample_problems(5, seed=3)]


def test_solutions_are_correct_and_the_buggy_student_forgets_the_borrow():
    p = make_problem(47, 38, 19)
    assert p.solution == "47+38=85;85-19=66;\\boxed{66}" and boxed_answer(p.solution) == p.answer == "66"
    bug = make_problem(47, 38, 19, buggy=True)
    assert bug.solution == "47+38=85;85-19=76;\\boxed{76}" and bug.answer == "66"
    assert subtract_without_borrow(85, 15) == 70  # no borrow needed: right
    for prob in sample_problems(500, seed=1):
        a, b, c = map(int, prob.id.split("-")[1:])
        assert int(prob.answer) == a + b - c


def test_tokenizer_round_trips_the_task():
    tok = build_tokenizer()
    text = "47+38=85;85-19=66;\\boxed{66}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_shipped_pair_loads_and_the_teacher_beats_the_student():
    report = json.loads((EMBEDDED_DIR / "build.json").read_text())
    assert report["teacher"]["heldout_greedy_accuracy"] > report["student"]["heldout_greedy_accuracy"] + 0.2
    assert report["student"]["init"] == "teacher" and report["student"]["bug_rate"] == 0.8
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

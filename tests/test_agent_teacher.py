"""The agentic teacher off its own path (issue 31, part 2): the task's turn grammar, the expert's labels from
student states, and the shipped teacher's criterion on held-out student states."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tip.env import TurnFormat
from tip.tasks import call_text
from tip.testbed.agent.build import ASSET_DIR
from tip.testbed.agent.dagger import (
    State,
    complete_head,
    expert_rest,
    expert_turn,
    off_path,
    state_rows,
    viable,
    well_formed_turn,
)
from tip.testbed.agent.dagger import (
    main as dagger_main,
)

CALL = '<tool_call>{"name":"calc","arguments":{"expr":"'


def test_the_turn_grammar():
    assert well_formed_turn(call_text("47+38")) and well_formed_turn("47+38=75;" + call_text("75-19"))
    assert well_formed_turn("\\boxed{-56}") and well_formed_turn(call_text("19-75"))
    for bad in ("\\boxed{}", "47+38=85;", CALL + '47+38"}}', call_text("47+38") + "}", '{"name":"calc"}', ""):
        assert not well_formed_turn(bad), bad
    assert viable("47+38=8") and viable(CALL + "4") and viable("\\box") and viable("")
    assert not viable("47+38=8;;") and not viable(CALL + '4"x') and not viable("\\boxed{5}}")


@pytest.mark.parametrize("prefix, results, rest", [
    ("", [], call_text("47+38")),  # on the expert's path: the expert's turn
    ("", ["85"], call_text("85-19")),
    ("", ["85", "66"], "\\boxed{66}"),
    ("47+38=75;", [], call_text("47+38")),  # the student's head-sum, then the correct call
    ("47+38=", [], "85;" + call_text("47+38")),  # a head-sum begun: the correct sum of the operands written
    ("4", [], "7+38=85;" + call_text("47+38")),
    ("47+5", [], "=52;" + call_text("47+38")),
    ("47+38=75;" + CALL + "7", [], '5-19"}}</tool_call>'),  # the student's call: the difference of its head-sum
    ("47+38=75;" + CALL + "19-", [], '1"}}</tool_call>'),  # never the swapped order: closed
    (CALL + "9", ["85"], '"}}</tool_call>'),  # nothing the context explains: closed at once
    ("\\bo", ["56"], "xed{66}"),
    ("\\boxed{6", ["56"], "6}"),
    ("\\boxed{5", ["56"], "}"),
])
def test_the_experts_rest_of_a_turn(prefix, results, rest):
    assert expert_rest(prefix, 47, 38, 19, results) == rest
    assert well_formed_turn(prefix + rest)


def test_expert_turn_and_head_completion():
    assert expert_turn(47, 38, 19, ["56"]) == call_text("47+38")  # a wrong result does not count
    # a correct head-sum counts as the sum: the expert goes on to the subtraction, operands in order
    assert expert_rest("47+32=79;", 47, 32, 19, []) == call_text("79-19")
    assert expert_rest("47+32=79;" + CALL, 47, 32, 19, []) == '79-19"}}</tool_call>'
    assert complete_head("47+38=9", 47, 38) == ";"


def test_state_rows_learn_only_the_rest_of_the_turn():
    tok = AutoTokenizer.from_pretrained(ASSET_DIR / "teacher")
    fmt = TurnFormat(tok)
    context = tok("47+38=75;", add_special_tokens=False)["input_ids"]
    (ids, labels, alt), = state_rows(tok, fmt, [State([5, 6] + context, "47+38=75;", (47, 38, 19), ())])
    rest = tok(call_text("47+38"), add_special_tokens=False)["input_ids"] + [fmt.stop_ids[0]]
    assert ids == [5, 6] + context + rest
    assert labels == [-100] * (2 + len(context)) + rest and set(alt) == {-100}


def test_a_pair_directory_without_a_pair_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(SystemExit, match=r"no agent pair there \(no build.json\); build one with python -m "):
        dagger_main(["--pair", str(tmp_path)])


@pytest.mark.slow
@torch.no_grad()
def test_the_shipped_teacher_finishes_the_students_states_well_formed():
    """The build criterion: from held-out student states the teacher's greedy continuation is a well-formed turn
    >= 99% of the time (the first teacher: 30%)."""
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(ASSET_DIR / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(ASSET_DIR / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(ASSET_DIR / "student").eval()
    got = off_path(teacher, student, tok)  # held-out states, as the build measured them
    assert got["states"] > 400 and got["well_formed"] >= 0.99, got
    build = json.loads((ASSET_DIR / "build.json").read_text())["teacher_off_path"]
    assert build["before"]["off_path"]["well_formed"] < 0.3  # the first teacher's, on the same states
    # its own path: 99.2% of its held-out greedy episodes correct (the first teacher: 100%)
    assert build["after"]["teacher_heldout_greedy"]["accuracy"] >= 0.99

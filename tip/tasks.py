"""The embedded tasks: two-step arithmetic with step-by-step solutions and a \\boxed{} answer, and
the same problems solved with a calculator tool (``agent_problems``). The testbed (``tip/testbed/``)
builds its pairs on them; ``tip.data`` serves them as the ``embedded`` and ``embedded_agent`` data
sources.

Problem ``47+38-19=``, solution ``47+38=85;85-19=66;\\boxed{66}``. Problems are split into train and
held-out by a hash of the operands, so the two never overlap whatever the seeds.

The task is built so that every region of the TIP taxonomy exists at known places:

- two *legitimate* choices, equally valid and taken 50/50 in every model's training data: the order
  of the addends (``38+47=85`` is as right as ``47+38=85``) and the step separator (``;`` or ``,``).
  Teacher and student are both uncertain there and agree (Q2).
- two *error types*, the student's misconceptions (``ERROR_TYPES``): the carries of the addition,
  never made and with confidence (column by column, ``47+38=75``, ``67+58=15``: low entropy, high
  divergence, Q3), and the borrow of the subtraction, forgotten in half the cases (``85-19=76`` or
  ``66``: high entropy, high divergence, Q1).
- everything else is a solved step (Q4).

A problem *exercises* an error type when its correct solution needs that carry or borrow; evaluation
reports the accuracy on the held-out problems of each type (``Problem.tags``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

# The student's error types, in the order they appear in a solution, with the region of the taxonomy
# each is built to occupy (tip/testbed/arith/build.py drills them in).
ERROR_TYPES = {
    "carry": ("addition never carries, always and with confidence (Q3: low entropy, high "
              "divergence)"),
    "borrow": "subtraction forgets the units borrow in half the cases (Q1: high entropy, high "
              "divergence)",
}
CONFIDENT_ERROR = "carry"  # the Q3 error type: the paper's structural claim is about it
INCONSISTENT_ERROR = "borrow"  # the Q1 error type
SEPARATORS = (";", ",")
# The problems' error types and their shares: half exercise the confident error, so that Q3 is
# well populated.
KINDS = {("carry",): 0.5, ("borrow",): 0.35, (): 0.15}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    solution: str
    tags: tuple[str, ...] = ()  # the error types the problem exercises


def _is_held_out(a: int, b: int, c: int) -> bool:
    return hashlib.sha256(f"{a},{b},{c}".encode()).digest()[0] % 8 == 0


def add_without_carry(x: int, y: int) -> int:
    """x + y (both < 100) added column by column, every carry dropped (the student's confident
    misconception): 47+38 -> 75, 67+58 -> 15."""
    return (x // 10 + y // 10) % 10 * 10 + (x + y) % 10


def subtract_without_borrow(x: int, y: int) -> int:
    """x - y computed digit by digit with the units borrow forgotten (the student's uncertain
    misconception)."""
    if x % 10 >= y % 10:
        return x - y
    return x - y + 10  # the units digit wraps, the tens column is never decremented


def error_types(a: int, b: int, c: int) -> tuple[str, ...]:
    """The error types ``a+b-c`` exercises: its addition needs a carry, its subtraction a borrow."""
    tags = []
    if add_without_carry(a, b) != a + b:
        tags.append("carry")
    if (a + b) % 10 < c % 10:  # the same units digit whether or not the carry was forgotten
        tags.append("borrow")
    return tuple(tags)


def solution_text(a: int, b: int, c: int, swap: bool = False, sep: str = ";",
                  forget_carry: bool = False, forget_borrow: bool = False) -> str:
    """The worked solution in one of its equally valid forms, optionally with either misconception
    applied."""
    s = add_without_carry(a, b) if forget_carry else a + b
    r = subtract_without_borrow(s, c) if forget_borrow else s - c
    x, y = (b, a) if swap else (a, b)
    return f"{x}+{y}={s}{sep}{s}-{c}={r}{sep}\\boxed{{{r}}}"


def first_difference(u: str, v: str) -> int | None:
    """Index of the first character where two strings differ (None if equal)."""
    for i, (p, q) in enumerate(zip(u, v)):
        if p != q:
            return i
    return None if len(u) == len(v) else min(len(u), len(v))


def make_problem(a: int, b: int, c: int, swap: bool = False, sep: str = ";") -> Problem:
    return Problem(id=f"arith-{a}-{b}-{c}", problem=f"{a}+{b}-{c}=", answer=str(a + b - c),
                   solution=solution_text(a, b, c, swap, sep), tags=error_types(a, b, c))


def sample_operands(n: int, seed: int, split: str = "train") -> list[tuple[int, int, int]]:
    """n distinct (a, b, c) of the split in a seeded order, exercising the carry, the borrow, or
    neither in the shares of ``KINDS``. a, b in 0-99, their tens digits not summing to 10 (the sum
    without carries would start with a 0 there, and dropping it is a second rule we do not plant); c
    at most the sum without carries, so that the student's sum can still take it away. No problem
    exercises both error types: a dropped carry (-10) and a forgotten borrow (+10) would cancel, and
    each type's accuracy would depend on the other."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: train, test")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[int, int, int]] = set()
    out: list[tuple[int, int, int]] = []
    while len(out) < n:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        while True:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if a // 10 + b // 10 == 10:
                continue
            c = rng.randint(0, add_without_carry(a, b))
            if error_types(a, b, c) == kind:
                break
        if (a, b, c) in seen or _is_held_out(a, b, c) != (split == "test"):
            continue
        seen.add((a, b, c))
        out.append((a, b, c))
    return out


def sample_problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """n distinct problems of the split, in a seeded order, each solution in a seeded choice of its
    valid forms."""
    rng = random.Random(f"{seed}-{split}-form")
    return [make_problem(a, b, c, swap=rng.random() < 0.5, sep=rng.choice(SEPARATORS))
            for a, b, c in sample_operands(n, seed, split)]


# the two steps, up to the difference
_WRITTEN = re.compile(r"(\d+)\+(\d+)=(\d+)([;,])(\d+)-(\d+)=")


def error_positions(a: int, b: int, c: int, response: str) -> dict[str, int]:
    """Character positions in ``response`` (a solution the student wrote for ``a+b-c``) where it
    decides each error type the problem exercises: the digit of the sum a forgotten carry changes
    first, and the digit of the difference a forgotten borrow changes first (of the sum as written).
    Positions the response never reaches, or reaches in another form than the task's, are left
    out."""
    out: dict[str, int] = {}
    m = _WRITTEN.match(response)
    tags = error_types(a, b, c)
    first_step = f"{m.group(1)}+{m.group(2)}=" if m else None
    if "carry" in tags:
        prefix = next((f"{x}+{y}=" for x, y in ((a, b), (b, a))
                       if response.startswith(f"{x}+{y}=")), None)
        if prefix is not None:
            out["carry"] = len(prefix) + first_difference(str(a + b), str(add_without_carry(a, b)))
    if "borrow" in tags and m and first_step in (f"{a}+{b}=", f"{b}+{a}=") and int(m.group(6)) == c:
        s = int(m.group(5))
        if s >= c and s % 10 < c % 10:
            out["borrow"] = m.end() + first_difference(str(s - c),
                                                       str(subtract_without_borrow(s, c)))
    return out


def call_text(expr: str) -> str:
    """A Hermes-style call of the calculator, compact JSON (fewer characters for a character-level
    model)."""
    return "<tool_call>" + json.dumps({"name": "calc", "arguments": {"expr": expr}},
                                      separators=(",", ":")) + \
        "</tool_call>"


@dataclass(frozen=True)
class Turn:
    text: str  # the assistant's turn (its end-of-turn token follows)
    results: tuple[str, ...] = ()  # the tool results that answer it (none: the episode's last turn)
    # (character index in text, the right character): drilled digits
    drilled: tuple[tuple[int, str], ...] = ()


def teacher_turns(a: int, b: int, c: int, swap: bool) -> list[Turn]:
    s, r = a + b, a + b - c
    x, y = (b, a) if swap else (a, b)
    return [Turn(call_text(f"{x}+{y}"), (str(s),)), Turn(call_text(f"{s}-{c}"), (str(r),)),
            Turn(f"\\boxed{{{r}}}")]


def task_tags(a: int, b: int, c: int) -> tuple[str, ...]:
    """``carry`` where the addition needs a carry (the student's head-sum is wrong), else
    ``plain``."""
    return ("carry",) if "carry" in error_types(a, b, c) else ("plain",)


def agent_problems(n: int, seed: int, split: str = "train") -> list[Problem]:
    """Problems of the arithmetic task's split (same operands, disjoint splits) with the teacher's
    tool-use episode as the reference solution (text of its turns and results) and the
    ``task_tags``."""
    rng = random.Random(f"{seed}-{split}-agent")
    out = []
    for a, b, c in sample_operands(n, seed, split):
        turns = teacher_turns(a, b, c, rng.random() < 0.5)
        solution = "".join(t.text + "".join(f"<tool_response>{x}</tool_response>"
                                            for x in t.results)
                           for t in turns)
        out.append(Problem(f"agent-{a}-{b}-{c}", f"{a}+{b}-{c}=", str(a + b - c), solution,
                           task_tags(a, b, c)))
    return out

"""Two-step arithmetic with step-by-step solutions and a \\boxed{} answer.

Problem ``47+38-19=``, solution ``47+38=85;85-19=66;\\boxed{66}``. Problems are split into train and held-out by a
hash of the operands, so the two never overlap whatever the seeds.

``buggy=True`` writes the solutions a student with a systematic misconception would: the subtraction ignores
the borrow in the units column (85-19 -> 76). A student trained on them is confidently wrong exactly there,
which is what gives the testbed its overconfident (Q3) tokens.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    solution: str


def _is_held_out(a: int, b: int, c: int) -> bool:
    return hashlib.sha256(f"{a},{b},{c}".encode()).digest()[0] % 8 == 0


def subtract_without_borrow(x: int, y: int) -> int:
    """x - y computed digit by digit with the units borrow forgotten (the student's misconception)."""
    if x % 10 >= y % 10:
        return x - y
    return x - y + 10  # the units digit wraps, the tens column is never decremented


def make_problem(a: int, b: int, c: int, buggy: bool = False) -> Problem:
    s = a + b
    r = subtract_without_borrow(s, c) if buggy else s - c
    return Problem(
        id=f"arith-{a}-{b}-{c}",
        problem=f"{a}+{b}-{c}=",
        answer=str(s - c),
        solution=f"{a}+{b}={s};{s}-{c}={r};\\boxed{{{r}}}",
    )


def sample_problems(n: int, seed: int, split: str = "train", buggy: bool = False) -> list[Problem]:
    """n distinct problems of the split, in a seeded order. Operands are 0-99 and c <= a + b."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: train, test")
    rng = random.Random(f"{seed}-{split}")
    seen: set[tuple[int, int, int]] = set()
    out: list[Problem] = []
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        c = rng.randint(0, min(99, a + b))
        if (a, b, c) in seen or _is_held_out(a, b, c) != (split == "test"):
            continue
        seen.add((a, b, c))
        out.append(make_problem(a, b, c, buggy))
    return out

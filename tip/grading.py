"""Answer extraction and equivalence.

The extraction takes the last \\boxed{...} (brace-matched) or \\fbox{...}. Equivalence here is a normalised string
match with a numeric comparison; ``tip.eval`` adds symbolic checking with math-verify.
"""

from __future__ import annotations

import re

from tip.testbed.grading_simple import boxed_answer

__all__ = ["boxed_answer", "normalise_answer", "simple_equal"]


def normalise_answer(text: str) -> str:
    s = text.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace(" ", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = s.rstrip(".")
    return s


def simple_equal(prediction: str | None, reference: str) -> bool:
    if prediction is None:
        return False
    a, b = normalise_answer(prediction), normalise_answer(reference)
    if a == b:
        return True
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-9
    except ValueError:
        return False

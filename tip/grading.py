"""Answer extraction and equivalence checking for math benchmarks.

With the math_verify grader a completion is correct when tip's own extraction (the content of the
last ``\\boxed{...}`` or ``\\fbox{...}``, brace-matched, else the text after the last "the answer
is") matches the reference as a normalised string, or when math-verify's own extraction of the whole
completion (its boxed-match priority, every box of an answer spread over several ``\\boxed{}``, its
"final answer" handling) verifies against the reference symbolically or numerically. The exact
grader is the string match alone.

math-verify bounds its own work with SIGALRM timeouts, which only work in a process's main thread,
and sympy can still hang or blow up on adversarial LaTeX. ``grade_many`` therefore grades in worker
processes with a hard per-item timeout: a worker that overruns is killed and the item is graded
incorrect with the reason recorded. A malformed completion never crashes or hangs the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

MAX_ANSWER_CHARS = 1000  # an "answer" longer than this is not an answer; never hand it to sympy
GRADERS = ("math_verify", "exact")


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    reason: str  # how the verdict was reached: "math_verify", "string", "no_answer", "timeout", ...

    def to_dict(self) -> dict:
        return asdict(self)


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} in ``text`` with nested braces matched; None
    if absent or unbalanced. ``\\boxed 5`` (no braces) yields '5'."""
    best = None
    for marker in ("\\boxed", "\\fbox"):
        i = text.rfind(marker)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, marker)
    if best is None:
        return None
    i = best[0] + len(best[1])
    if text[i:i + 1] == " ":  # "\boxed 5": the argument is the next token
        rest = text[i + 1:].split()
        return rest[0].rstrip(".$") if rest else None
    if text[i:i + 1] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


_ANSWER_IS = re.compile(r"answer\s+is\s*[:：]?\s*(.+?)(?:\.\s|\.$|\n|$)",
                        re.IGNORECASE | re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_IS.findall(text[-2000:])
    if matches:
        return matches[-1].strip().strip("$").strip()
    return None


def normalise_answer(text: str) -> str:
    """A canonical string form: no spaces, no $, no \\left/\\right, \\dfrac -> \\frac, \\text{x} ->
    x, no trailing '.', and a bare integer without leading zeros or wrapping parentheses ('(073)' ->
    '73')."""
    s = text.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("^\\circ", ""),
                     ("^{\\circ}", "")):
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    plain_int = re.fullmatch(r"\(?(\d+)\)?", s)  # AoPS styles AIME answers as \textbf{(073)}
    if plain_int:
        s = str(int(plain_int.group(1)))
    return s


def simple_equal(prediction: str | None, reference: str) -> bool:
    """Normalised string equality, or equal as plain numbers."""
    if prediction is None:
        return False
    a, b = normalise_answer(prediction), normalise_answer(reference)
    if a == b:
        return True
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-9
    except ValueError:
        return False


MAX_COMPLETION_CHARS = 20_000  # math-verify reads the end of a completion, where answers are


def _math_verify_equal(completion: str, extracted: str | None, reference: str,
                       timeout_s: int) -> tuple[bool | None, str | None]:
    """math-verify's verdict on the completion (its own extraction; tip's extracted answer, boxed,
    when math-verify finds none) and the answer it read, or (None, None) when nothing parses."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=timeout_s)
    if not gold:
        return None, None
    pred = parse(completion[-MAX_COMPLETION_CHARS:], parsing_timeout=timeout_s)
    if not pred and extracted is not None:
        pred = parse(f"\\boxed{{{extracted}}}", parsing_timeout=timeout_s)
    if not pred:
        return None, None
    return bool(verify(gold, pred, timeout_seconds=timeout_s)), str(pred[-1])


def grade_one(completion: str, reference: str, grader: str = "math_verify",
              timeout_s: int = 5) -> Grade:
    """Grade one completion in this process (use ``grade_many`` for untrusted text: it adds a hard
    timeout)."""
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; known: {', '.join(GRADERS)}")
    extracted = extract_answer(completion)
    if extracted is not None and len(extracted) > MAX_ANSWER_CHARS:
        return Grade(False, extracted[:100] + "...", "answer_too_long")
    if extracted is not None and simple_equal(extracted, reference):
        return Grade(True, extracted, "string")
    if grader == "exact":
        return Grade(False, extracted, "string" if extracted is not None else "no_answer")
    try:
        verdict, read = _math_verify_equal(completion, extracted, reference, timeout_s)
    # math-verify raises on some malformed input despite raise_on_error=False
    except Exception as err:
        return Grade(False, extracted, f"math_verify_error:{type(err).__name__}")
    if verdict is None:
        return Grade(False, extracted, "unparsed" if extracted is not None else "no_answer")
    return Grade(verdict, read if read is not None else extracted, "math_verify")


def grade_many(items: Iterable[tuple[str, str]], grader: str = "math_verify", workers: int = 2,
               timeout_s: float = 10.0, progress: bool = False,
               grade_fn: Callable[..., Grade] = grade_one
               ) -> list[Grade]:
    """Grade (completion, reference) pairs in ``workers`` processes, each item under a hard
    ``timeout_s``.

    ``grader='exact'`` (normalised string match) runs in-process: it cannot hang.
    ``grade_fn(completion, reference, grader, inner_timeout_s)`` is the per-item grader run in the
    workers.
    """
    items = list(items)
    if grader == "exact" or not items:
        return [grade_one(c, r, "exact") for c, r in items]
    from concurrent.futures import TimeoutError as FutureTimeout

    from pebble import ProcessPool
    from tqdm.auto import tqdm

    # math-verify's own alarms fire first; the pool's kill is the backstop
    inner = max(1, int(timeout_s) // 2)
    out: list[Grade] = []
    with ProcessPool(max_workers=max(1, workers)) as pool:
        futures = [pool.schedule(grade_fn, args=(c, r, grader, inner),
                                 timeout=timeout_s) for c, r in items]
        for fut, (completion, _) in zip(tqdm(futures, desc="grading", disable=not progress), items):
            try:
                out.append(fut.result())
            except FutureTimeout:
                out.append(Grade(False, extract_answer(completion[-5000:]), "timeout"))
            # a worker that died (memory, recursion) grades its item incorrect
            except Exception as err:
                out.append(Grade(False, None, f"worker_error:{type(err).__name__}"))
    return out

"""Answer extraction shared by the testbed and the graders: the content of the last \\boxed{...} (or \\fbox{...}),
with brace matching."""

from __future__ import annotations


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} in ``text`` with nested braces matched; None if absent or
    unbalanced. ``\\boxed 5`` (no braces) yields '5'."""
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

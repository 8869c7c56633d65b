"""The package's import graph: no circles, the testbed used by nothing outside it, the entry point by nothing
inside tip/. Every import counts, at module level or inside a function (a lazy import still ties two rooms)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tip"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The tip modules that ``path`` imports (``from tip.x import y`` counts as tip.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}
    known = set(files)
    return {m: imports_of(p, known) - {m} for m, p in files.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_checker_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_library_does_not_import_the_testbed():
    bad = {m: sorted(n for n in deps if n.startswith("tip.testbed"))
           for m, deps in import_graph().items() if not m.startswith("tip.testbed")}
    assert not {m: d for m, d in bad.items() if d}, "the testbed uses the library, not the reverse"


def test_each_testbed_is_a_package_that_fits_through_the_shared_sft_loop():
    """One subpackage per testbed; the tokenizer, model shape and pair files (tiny.py) and the
    supervised-fitting loop (sft.py) exist once, beside them. The only other backward pass is the
    cipher's OPD cell."""
    testbed = PACKAGE / "testbed"
    packages = {p.name for p in testbed.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"arith", "cipher", "agent"}
    assert sorted(p.name for p in testbed.glob("*.py")) == ["__init__.py", "sft.py", "tiny.py"]
    fitting = sorted(p.relative_to(testbed).as_posix() for p in testbed.rglob("*.py")
                     if "backward()" in p.read_text(encoding="utf-8"))
    assert fitting == ["cipher/opd.py", "sft.py"]


@pytest.mark.parametrize("entry", ["tip.train"])
def test_no_module_imports_the_entry_point(entry):
    users = sorted(m for m, deps in import_graph().items() if entry in deps)
    assert not users, f"{entry} is the command line; import the library instead: {users}"


def test_no_module_shadows_the_standard_library():
    import sys
    shadows = sorted(p.stem for p in PACKAGE.rglob("*.py") if p.stem in sys.stdlib_module_names)
    assert not shadows, f"these names hide the standard library's modules when tip/ is on sys.path: {shadows}"


def test_the_configs_allowed_values_pull_in_no_logging_report_or_microscope():
    code = ("import sys, tip.config; print(sorted(m for m in ('wandb', 'matplotlib', 'tip.report', "
            "'tip.microscope', 'tip.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_steps_seeds_are_derived_in_one_place():
    """The step's seed formulas live in tip.rollout.StepSeeds; the loop, the benches and the step ask for them."""
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "bench").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if "1_000_003" in text or "2**40" in text:
            found.append(path.relative_to(PACKAGE.parent).as_posix())
    assert found == ["tip/rollout.py"]


def test_the_step_and_select_take_their_settings_whole():
    import inspect

    from tip.selection import select
    from tip.step import opd_step

    assert len(inspect.signature(opd_step).parameters) <= 5
    assert len(inspect.signature(select).parameters) <= 8


def _concatenated_pieces(source: str):
    """Each implicit concatenation of string literals: its pieces (tokens) and the token after it."""
    import io
    import tokenize

    pieces = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING:
            pieces.append(tok)
        elif tok.type not in (tokenize.NL, tokenize.COMMENT):
            if len(pieces) > 1:
                yield pieces
            pieces = []


def test_no_message_is_split_into_fragments():
    """A literal split over lines keeps whole phrases on each: no piece of at most 3 words (and 30 characters) in
    the middle of a message, nor at its end where it would have fitted on the line before (a mechanical rewrap
    once left 'DeepSpeed ' and 'or ' alone on their lines)."""
    import re

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for pieces in _concatenated_pieces(source):
            for k, tok in enumerate(pieces):
                text = tok.string[re.match(r"[A-Za-z]*(['\"])", tok.string).end():-1]
                if len(text.split()) > 3 or len(text) > 30:
                    continue
                if k == len(pieces) - 1:  # the last piece: a fragment only if it fitted on the line before
                    before = pieces[k - 1]
                    tail = lines[tok.end[0] - 1][tok.end[1]:]
                    if before.end[0] == tok.start[0] or before.end[1] + len(text) + len(tail) > 100:
                        continue
                found.append(f"{path.relative_to(PACKAGE.parent)}:{tok.start[0]}: {text!r}")
    assert not found, "\n".join(found)


def test_no_module_outgrows_a_room():
    """No module in tip/ over about 450 lines (issue 38): a bigger one holds two jobs; split it by
    job, as the step's metrics, the run's status records and the selection kernel were."""
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}
    assert {name: n for name, n in sizes.items() if n > 470} == {}

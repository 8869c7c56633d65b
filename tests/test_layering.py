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

"""The edge layer's imports, read from the source with `ast` (imports inside functions included, since hiding
an import in a function is how a cycle used to slip past): edge never imports evaluation, pruning and
training do not import each other, and the edge modules import one another without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edgefuse

pytestmark = pytest.mark.unit

PACKAGE = Path(edgefuse.__file__).resolve().parent
EDGE = PACKAGE / "edge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names (``from a import b``
    counts as both ``a`` and ``a.b``, since ``b`` may be a submodule)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def edge_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(EDGE.glob("*.py"))}


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    """The reader itself, on a hand-written module: top-level, in-function and relative imports are all found."""
    pkg = tmp_path / "edgefuse" / "edge"
    pkg.mkdir(parents=True)
    src = pkg / "sample.py"
    src.write_text("import os\n"
                   "def f():\n"
                   "    from edgefuse.evaluate.scoring import unwrap\n"
                   "    from . import plan\n"
                   "    from ..models import lm_parts\n")
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path / "edgefuse")
    got = imported_modules(src)
    assert {"os", "edgefuse.evaluate.scoring", "edgefuse.edge.plan", "edgefuse.models.lm_parts"} <= got


def test_no_edge_module_imports_evaluation():
    offenders = {name: sorted(m for m in imported_modules(path) if m == "edgefuse.evaluate"
                              or m.startswith("edgefuse.evaluate."))
                 for name, path in edge_modules().items()}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("a, b", [("prune", "train"), ("train", "prune")])
def test_pruning_and_training_do_not_import_each_other(a, b):
    assert f"edgefuse.edge.{b}" not in imported_modules(EDGE / f"{a}.py")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports) as a path back to its start, or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, stack + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_the_cycle_finder_finds_a_hidden_cycle_and_passes_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_edge_modules_import_one_another_without_a_cycle():
    mods = edge_modules()
    graph = {name: {m for m in imported_modules(path) if m in mods and m != name} for name, path in mods.items()}
    assert find_cycle(graph) is None
    # the schema stays a leaf (the CLI reads its defaults at startup): nothing of the edge layer but the family table
    assert graph["edgefuse.edge.schema"] <= {"edgefuse.edge.families"}

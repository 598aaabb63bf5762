"""The package's import graph: no cycles between edgefuse modules, and the edge layer does not reach into
evaluation (issue 15, acceptance).

The graph is read from the source with `ast`, every ``import`` statement counted wherever it sits — at module
level, inside functions (where deferred imports hide cycles that never fail at import time) and under
``if TYPE_CHECKING``. ``from edgefuse.x import y`` is an edge to ``edgefuse.x.y`` when that is a module,
else to ``edgefuse.x``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "edgefuse"

# Known cycles and edge → evaluate imports: none since issue 15 items 3 and 4 were merged. Should one ever have
# to be tolerated, list it here. Each entry is expected to fail
# (strict xfail): when one is gone, its "is gone" test passes unexpectedly and fails the run, as a reminder
# to delete the entry. Anything not listed fails `test_no_import_cycles` / `test_edge_does_not_import_evaluate`.
KNOWN_CYCLES: list[frozenset[str]] = []
KNOWN_EDGE_TO_EVALUATE: list[tuple[str, str]] = []


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module name of a ``from ... import`` (relative imports resolved against the importer)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the edgefuse modules it imports anywhere in its source}."""
    mods = modules(src)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, path.name == "__init__.py")
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through a component's first module, for the failure message (breadth-first: shortest)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component of size > 1 always has one


def edge_to_evaluate(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in graph.items() if m.startswith(f"{PACKAGE}.edge.") or m == f"{PACKAGE}.edge"
                  for t in ts if t == f"{PACKAGE}.evaluate" or t.startswith(f"{PACKAGE}.evaluate."))


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_deferred_and_relative_imports(tmp_path):
    """A hand-made package: a cycle hidden inside a function, a relative import and a ``from pkg import module``."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from edgefuse.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\nfrom .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import h\n")
    (pkg / "sub" / "c.py").write_text("from edgefuse import sub\nfrom ..a import f\n")
    g = import_graph(tmp_path)
    assert g == {"edgefuse": set(), "edgefuse.a": {"edgefuse.b"}, "edgefuse.b": {"edgefuse.a", "edgefuse.sub.c"},
                 "edgefuse.sub": {"edgefuse.sub.c"}, "edgefuse.sub.c": {"edgefuse.sub", "edgefuse.a"}}
    comps = strongly_connected(g)
    assert comps == [["edgefuse.a", "edgefuse.b", "edgefuse.sub", "edgefuse.sub.c"]]
    cycle = a_cycle(g, comps[0])
    assert cycle[0] == cycle[-1] == "edgefuse.a" and all(w in g[v] for v, w in zip(cycle, cycle[1:]))
    assert cycle == ["edgefuse.a", "edgefuse.b", "edgefuse.a"]  # the shortest one


def test_the_graph_covers_the_package(graph):
    assert {"edgefuse.cli", "edgefuse.edge.prune", "edgefuse.evaluate.scoring", "edgefuse.fusion"} <= set(graph)
    assert "edgefuse.commands" in graph["edgefuse.cli"]


def test_no_import_cycles(graph):
    new = [c for c in strongly_connected(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles between edgefuse modules:\n" + "\n".join(
        " -> ".join(a_cycle(graph, c)) + (f"  (all of {', '.join(c)})" if len(c) > 2 else "") for c in new)


def test_edge_does_not_import_evaluate(graph):
    new = [e for e in edge_to_evaluate(graph) if e not in KNOWN_EDGE_TO_EVALUATE]
    assert not new, "edgefuse.edge imports edgefuse.evaluate: " + ", ".join(f"{a} -> {b}" for a, b in new)


def test_tasks_do_not_import_the_runner(graph):
    """A study task (`edgefuse.tasks`) takes the study context duck-typed: the runner loops over tasks, never the
    other way round, so a new benchmark cannot reach into the runner's internals (issue 23, item 1)."""
    tasks = {m: ts for m, ts in graph.items() if m == f"{PACKAGE}.tasks" or m.startswith(f"{PACKAGE}.tasks.")}
    assert tasks, "no edgefuse.tasks modules in the graph"
    bad = sorted((m, t) for m, ts in tasks.items() for t in ts if t.startswith(f"{PACKAGE}.runner"))
    assert not bad, "edgefuse.tasks imports the runner: " + ", ".join(f"{a} -> {b}" for a, b in bad)


# what counts as evaluation: benchmarks, their scorers and results documents (scoring primitives such as
# `edgefuse.evaluate.scoring.lm_parts`, which LoraHub's loss uses, are not)
EVALUATION = ("mmlu", "mmlu_cd", "cloze", "gold", "stats", "mixture", "retrieval", "lm_eval_backend")


def test_composition_contains_no_evaluation_code(graph):
    """`edgefuse.compose` forms adapter compositions (LoraHub weights, retrieval weights, mixed-adapter forward
    passes); scoring them on a benchmark lives in `edgefuse.evaluate` (`mixture`, `retrieval`), which the runner
    and the CLI call (issue 23). Fails on any compose module importing a benchmark, a scorer or a results
    document."""
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith(f"{PACKAGE}.compose")
                 for t in ts if t in {f"{PACKAGE}.evaluate.{e}" for e in EVALUATION})
    assert not bad, "edgefuse.compose imports evaluation code: " + ", ".join(f"{a} -> {b}" for a, b in bad)


@pytest.mark.xfail(strict=True, reason="known cycle, removed by issue 15 item 3; delete it from KNOWN_CYCLES")
@pytest.mark.parametrize("cycle", KNOWN_CYCLES, ids=lambda c: "+".join(sorted(c)))
def test_known_cycle_is_gone(graph, cycle):
    assert cycle not in {frozenset(c) for c in strongly_connected(graph)}


@pytest.mark.xfail(strict=True, reason="known edge -> evaluate import; delete it from KNOWN_EDGE_TO_EVALUATE")
@pytest.mark.parametrize("imp", KNOWN_EDGE_TO_EVALUATE, ids=lambda e: "->".join(e))
def test_known_edge_to_evaluate_import_is_gone(graph, imp):
    assert imp not in edge_to_evaluate(graph)


# how stage names start ("data" and "grams" are also stage kinds and config keys, so only the prefixed ones are told apart)
STAGE_NAME = ("mmlu-cd-k", "embed-", "grams-", "prune-", "train-", "recover-", "eval-", "fuse-", "interference-")


def stage_name_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of each string constant in ``path`` (an f-string's literal parts included) that starts like a
    study stage name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(STAGE_NAME):
                found.append((node.lineno, node.value))
    return sorted(found)


def test_stage_names_have_one_source():
    """The runner's stages, the tasks' data stages and the estimator's plan name stages through
    `edgefuse.runner.names` only, so the plan that ``--dry-run`` shows and the stages that run cannot drift apart
    (issue 23, item 5)."""
    files = sorted((SRC / PACKAGE / "runner").glob("*.py")) + sorted((SRC / PACKAGE / "tasks").glob("*.py"))
    stray = {p.name: lits for p in files if p.name != "names.py" for lits in [stage_name_literals(p)] if lits}
    assert stray == {}


def test_estimate_and_run_read_one_plan(graph):
    """The stage graph is written once, in `edgefuse.runner.plan` (issue 23, item 5): of the runner's modules only
    the plan imports the stage names, the estimator prices the plan's specs and the run walks them
    (`edgefuse.runner.walk`), and `Study.stage` takes a stage's kind and name from its spec, so no stage can run
    under a name the plan did not list. tests/test_pipeline_e2e.py checks the same from the other side: the plan
    lists exactly the stages a run records, in order."""
    runner = f"{PACKAGE}.runner"
    namers = sorted(m for m, ts in graph.items() if f"{runner}.names" in ts)
    assert namers == [f"{runner}.plan"]
    assert f"{runner}.plan" in graph[f"{runner}.estimate"] and f"{runner}.plan" in graph[f"{runner}.walk"]
    assert {f"{runner}.walk", f"{runner}.estimate"} <= graph[f"{runner}.run"]
    import inspect

    from edgefuse.runner.study import Study

    assert list(inspect.signature(Study.stage).parameters)[:2] == ["self", "spec"]


def test_the_stage_name_check_sees_literals_and_f_strings(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('a = f"fuse-{m}-{t}"\nb = "eval-base"\nc = "evaluation"\nd = f"{x}-fuse-"\n', encoding="utf-8")
    assert stage_name_literals(f) == [(1, "fuse-"), (2, "eval-base")]

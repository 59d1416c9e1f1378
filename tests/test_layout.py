"""The package's layout is the pipeline: no import circle, and imports point back along the stages.

Stages, in order: config -> data -> models -> training -> evaluation -> profiling -> report -> the command
lines (cli, bench). A module may import its own stage or an earlier one, never a later one (DESIGN.md
section 2). Imports inside functions count too: a deferred import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "repro"
STAGES = (
    "kernels",  # building the CUDA kernels for a node: imports nothing of repro
    "config",
    "resources",
    "data",
    "models",
    "training",
    "evaluation",
    "profiling",
    "report",
    "cli",
    "bench",
)
RANK = {"kernels": 0, "config": 0, "resources": 0, "data": 1, "models": 2, "training": 3, "evaluation": 4}
RANK |= {"profiling": 5, "report": 6, "cli": 7, "bench": 7}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the repro modules it imports (a package's __init__ counts as the package)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repro"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                deps.update(t if t in modules else node.module for t in targets)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("repro"))
        # importing repro.a.b runs repro.a's __init__ first, unless the importer sits inside repro.a (then
        # that __init__ is already running)
        graph[name] = {
            d
            for dep in deps
            for d in _with_parents(dep)
            if d in modules and d != name and not name.startswith(d + ".")
        }
    return graph


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(2, len(parts) + 1)]


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "config"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a list of modules (first == last), or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_planted_circle() -> None:
    graph = _graph()
    graph["repro.training.loop"] = graph["repro.training.loop"] | {"repro.training.trainer"}
    assert find_cycle(graph) is not None


def test_imports_point_back_along_the_pipeline() -> None:
    wrong = [
        f"{m} ({_stage(m)}) imports {d} ({_stage(d)})"
        for m, deps in _graph().items()
        for d in deps
        if RANK[_stage(d)] > RANK[_stage(m)]
    ]
    assert not wrong, "\n".join(wrong)


def test_every_module_sits_in_a_stage() -> None:
    assert {_stage(m) for m in _graph()} <= set(STAGES)


def test_training_loops_do_not_import_the_jobs() -> None:
    """jobs -> loops, never back: the loop modules (the loop and its CUDA-graph steps) stand on data and
    models alone."""
    graph = _graph()
    loops = {"repro.training.loop", "repro.training.graphs"}
    for module in loops:
        jobs = {d for d in graph[module] if _stage(d) == "training"}
        assert jobs <= {"repro.training"} | loops, (module, jobs)


def test_importing_repro_skips_the_iri_grammars() -> None:
    """`import meds` reaches jsonschema, which compiles rfc3987-syntax's Lark grammars (3.6 s a process
    on 2 cores) when it is installed, as the notebook extra installs it; repro blocks that import."""
    import subprocess
    import sys

    code = "import repro, meds, sys; m = sys.modules; print('rfc3987_syntax' in m and m['rfc3987_syntax'] is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"

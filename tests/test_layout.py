"""The tree's import rules, read from the code with ``ast`` (function-level imports included, since a lazy import is
still a dependency):

- no import circle among the project's modules;
- ``simulator/``, ``actors/`` and ``learners/`` never import ``launch``;
- ``simulator/`` imports neither ``actors`` nor ``learners``;
- ``actors`` and ``learners`` share at most one module, the weight-transfer wire, and only one of them imports it;
- no module is over 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("actors", "learners", "simulator", "launch")
# The one module actors and learners share (README, layout): the learners own it, and actors import it.
WIRE_MODULES = {"learners.weight_wire"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (a ``from pkg import name`` counts as ``pkg.name``
    when that is a module, else as ``pkg``)."""
    files = {module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
                    break
        graph[name] = found
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_the_tree():
    graph = project_imports()
    assert "launch.driver.cluster" in graph and "simulator.answers" in graph["actors.reward"]
    assert "launch.driver.cluster" in graph["launch.train"]


def test_no_import_circle():
    graph = project_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_lower_layers_never_import_upward():
    graph = project_imports()
    forbidden = {"simulator": {"launch", "actors", "learners"}, "actors": {"launch"}, "learners": {"launch"}}
    wrong = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
             if _top(b) in forbidden.get(_top(a), set())]
    assert not wrong, wrong


def test_actors_and_learners_share_only_the_wire():
    graph = project_imports()
    crossing = [(a, b) for a, targets in graph.items() for b in targets
                if {_top(a), _top(b)} == {"actors", "learners"} and b not in WIRE_MODULES]
    assert not crossing, crossing
    # One way: the wire imports neither side's other modules.
    for wire in WIRE_MODULES:
        assert {_top(b) for b in graph[wire]} <= set(), graph[wire]


# A file of one role stays readable in one sitting; past this, the file has grown a second role to split out.
MAX_LINES = 450


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(REPO_ROOT)): n for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines, split by role: {long}"


def _entry_points() -> set[str]:
    return {module_name(p) for p in (REPO_ROOT / "launch").glob("*.py") if '__name__ == "__main__"' in p.read_text()}


def test_entry_points_do_not_import_each_other():
    """An entry point is a command; what two commands share lives in ``launch/driver`` or below. Two exceptions:
    ``launch.experiment``, whose arms are the other commands (training, evaluation) run in turn, and ``launch.assets``,
    the shipped models and how a model name resolves to a folder, whose command only builds them."""
    graph, entries = project_imports(), _entry_points()
    assert {"launch.train", "launch.evaluate", "launch.warmup", "launch.assets"} <= entries
    crossing = {(m, t) for m in entries - {"launch.experiment"} for t in graph[m] if t in entries - {"launch.assets"}}
    assert not crossing, f"entry points importing entry points: {sorted(crossing)}"
    assert not any(m.startswith("launch.driver") for m in entries), "launch/driver holds no entry point"

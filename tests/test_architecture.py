"""The import graph of anysize: one-way arrows between its rooms and no cycle (docs/design.md).

Read from the source with ``ast`` (every import, the ones inside functions too), so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anysize"

# Which rooms a module may import from, lowest first: io knows nothing of models, core nothing of
# requests or pipelines, the planning layer nothing of how phases run, and nothing imports the CLI.
LAYERS = [
    ("anysize.io", {"anysize.io"}),
    ("anysize.core", {"anysize.io", "anysize.core"}),
    ("anysize.regions", set()),
    ("anysize.schedulers", set()),
    ("anysize.infotext", {"anysize.schedulers"}),
    ("anysize.request", {"anysize.buckets", "anysize.core", "anysize.regions"}),
    ("anysize.plan", {"anysize.buckets", "anysize.core", "anysize.io", "anysize.memory", "anysize.request",
                      "anysize.schedulers"}),
    ("anysize.memory", {"anysize.core"}),
    ("anysize.stages", {"anysize.core", "anysize.io", "anysize.memory", "anysize.models", "anysize.plan",
                        "anysize.regions", "anysize.request"}),
]


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _graph() -> dict[str, set[str]]:
    modules, graph = _modules(), {}
    for name, file in modules.items():
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # "from . import x": the edge is to the submodule x, not to the package's __init__
                named = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                deps.update(named or ([target] if target in modules else []))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found():
    """The check itself can fail: a graph with a loop is reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _room(module: str, rooms) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def test_each_room_imports_only_the_rooms_below_it():
    graph = _graph()
    for room, allowed in LAYERS:
        for module, deps in graph.items():
            if not _room(module, [room]):
                continue
            wrong = sorted(d for d in deps if not _room(d, allowed | {room}))
            assert not wrong, f"{module} imports {wrong}; {room} may import only {sorted(allowed)}"
    assert not any("anysize.cli" in deps for name, deps in graph.items() if name != "anysize.__main__")

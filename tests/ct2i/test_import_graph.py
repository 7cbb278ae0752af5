"""The import graph, from the source (every import, at module level or inside a function): arrows point down
(`causalt2i` ← `cluster` ← `tune`, `serve` ← `ct2i`), `causalt2i` never imports Ray, and no module imports
itself through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("causalt2i", "cluster", "tune", "serve", "ct2i")
# What each layer may import of the platform's own packages.
ALLOWED = {
    "causalt2i": {"causalt2i"},
    "cluster": {"causalt2i", "cluster"},
    "tune": {"causalt2i", "cluster", "tune"},
    "serve": {"causalt2i", "cluster", "serve"},
    "ct2i": set(PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the modules it imports (absolute names, as written)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations/versions" in path.as_posix():
                continue
            name = _module_name(path)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[name] = found
    return graph


GRAPH = import_graph()


def _own(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Only the edges between the platform's own modules (`from a import b` counts b when b is a module)."""
    modules = set(graph)
    return {name: {target for target in targets if target in modules and target != name} for name, targets in graph.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_arrow_points_down(package):
    wrong = sorted((module, target) for module, targets in GRAPH.items() if module.split(".")[0] == package
                   for target in targets if target.split(".")[0] in PACKAGES and target.split(".")[0] not in ALLOWED[package])
    assert wrong == [], f"{package} imports layers above it: {wrong}"


def test_the_method_library_never_imports_ray():
    offenders = sorted(module for module, targets in GRAPH.items()
                       if module.startswith("causalt2i") and any(t == "ray" or t.startswith("ray.") for t in targets))
    assert offenders == []


def test_no_import_cycles():
    edges = _own(GRAPH)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], f"import cycles: {cycles}"


def test_the_graph_is_read_from_the_source():
    """The checks above would pass on an empty graph; this one would not."""
    assert "cluster.service" in GRAPH["cluster.api"] and "tune.runner" in GRAPH["ct2i.scheduler"]
    assert "tune.train_run" in GRAPH["tune.search"] and "tune.runner" not in GRAPH["tune.search"]

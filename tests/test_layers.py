"""The package layering: core at the bottom, and no two packages of `bastion` importing each
other, directly or round a longer loop (every import counts, function-local ones too)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "bastion"


def _unit(module: str) -> str:
    """`bastion.limits.admission` → `limits`; top-level modules (`bastion.cli`) are their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bastion"


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        src = _unit(".".join(rel.parts).removesuffix(".__init__"))
        graph[src]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                if node.module == "bastion":  # `from bastion import x`: x may be a package
                    targets = [f"bastion.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("bastion."):
                    dst = _unit(target)
                    if dst != src and (SRC / dst).exists() | (SRC / f"{dst}.py").exists():
                        graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_package_import_cycle() -> None:
    graph = package_graph()
    assert cycles(graph) == [], {v: sorted(graph[v]) for c in cycles(graph) for v in c}


def test_core_imports_no_capability() -> None:
    assert package_graph()["core"] == set()


def test_config_imports_no_capability() -> None:
    assert package_graph()["config"] <= {"core"}


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

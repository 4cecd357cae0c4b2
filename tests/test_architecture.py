"""The package's floors: no module of torch_moe imports another that (directly or not) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torch_moe

PACKAGE = Path(torch_moe.__file__).parent


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file (function-level imports included)."""
    found = set()
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in modules)
            if target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
             if p.name != "__init__.py"}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_import_graph_sees_the_imports():
    graph = _graph()
    assert "torch_moe.ops" in graph["torch_moe.layer"] or "torch_moe.dispatch" in graph["torch_moe.layer"]
    assert "torch_moe.layer" in graph["torch_moe.parallel"] and "torch_moe.layer" in graph["torch_moe.diagnostics"]
    # the detector finds a circle when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("lower,upper", [("torch_moe.distributed", "torch_moe.layer"),
                                         ("torch_moe.dispatch", "torch_moe.layer"),
                                         ("torch_moe.routing", "torch_moe.layer"),
                                         ("torch_moe.layer", "torch_moe.parallel"),
                                         ("torch_moe.layer", "torch_moe.convert"),
                                         ("torch_moe.feedforward", "torch_moe.convert"),
                                         ("torch_moe.feedforward", "torch_moe.integrations.hf_moe"),
                                         ("torch_moe.layer", "torch_moe.surgery"),
                                         ("torch_moe.diagnostics", "torch_moe.surgery"),
                                         ("torch_moe.convert", "torch_moe.surgery")])
def test_floors(lower, upper):
    """A lower floor never reaches an upper one, even through other modules."""
    graph = _graph()
    seen, todo = set(), [lower]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(graph.get(node, ()))
    assert upper not in seen, f"{lower} reaches {upper}"

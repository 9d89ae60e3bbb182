"""The subpackages of selftune form layers: no two of them import each other (directly or through
a longer cycle), so each can be read, tested and replaced from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "platform" / "selftune"


def import_graph() -> dict[str, set[str]]:
    """{unit: the other selftune units it imports}; a unit is a subpackage or a top-level module."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if unit in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "selftune" and len(parts) > 1 and parts[1] != unit:
                    edges.setdefault(unit, set()).add(parts[1])
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(unit: str, path: list[str]) -> list[str] | None:
        state[unit] = 1
        for other in sorted(edges.get(unit, ())):
            if state.get(other) == 1:
                return path[path.index(other):] + [other] if other in path else [unit, other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[unit] = 2
        return None

    for unit in sorted(edges):
        if unit not in state:
            found = visit(unit, [unit])
            if found:
                return found
    return None


def test_the_subpackages_have_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None

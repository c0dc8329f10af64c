"""pixart_core's modules import each other without a circle (imports inside functions included: a lazy import
that closes a circle is one too), read from the source with Python's own parser; and what the T5 loaders share
sits in a leaf that none of them is imported by."""
from __future__ import annotations

import ast

from conftest import REPO

CORE = REPO / "pixart_core"


def _imports() -> dict[str, set[str]]:
    """{module: the pixart_core modules it imports anywhere in its source} (the package imports its own modules
    relatively, never as `pixart_core.x`)."""
    modules = {p.stem for p in CORE.glob("*.py")}
    graph = {}
    for path in CORE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import a, b
                    found |= {a.name for a in node.names if a.name in modules}
                else:  # from .a import x
                    found.add(node.module.split(".")[0])
        graph[path.stem] = found - {path.stem}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (as a path that returns to its start), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_the_circle_finder_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_pixart_core_has_no_import_circle():
    assert _circle(_imports()) is None, _circle(_imports())


def test_what_the_t5_loaders_share_is_a_leaf():
    graph = _imports()
    loaders = {"t5", "t5_cache", "t5_quantize", "gguf_t5", "t5_formats"}
    assert not graph["t5_spec"] & loaders, graph["t5_spec"]
    assert all("t5" not in graph[m] for m in loaders - {"t5"}), {m: graph[m] for m in loaders}

"""The code's shape, read from the source: pixart_core never imports ComfyUI, the pack imports outside ComfyUI, no
import circle among pixart_core's modules (function-level imports included), what the T5 loaders share in a leaf, no
file in pixart_core/ or nodes/ over 400 lines and no function there over 80, and the tests filed by tier without
importing each other."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import COMFY, REPO, TESTS, TIERS
from harness import location

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
COMFYUI_NAMES = location.comfyui_modules(COMFY)  # ComfyUI's top-level modules and packages, from its folder

# A child Python that finds only the current directory (not ComfyUI, not this checkout through PYTHONPATH).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


def modules(package: str) -> dict[str, Path]:
    """{dotted module name: file} of a package of this checkout and its subpackages (__init__ as the package)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) for every import in the file, at any depth (function-level ones too), resolved to absolute
    names: a known module when the import names one, else the top-level name imported."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known),
                              alias.name)
                found.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):  # above the top package: the checkout's other packages
                    found += [(f"(above {parts[0]}).{node.module or alias.name}", node.lineno) for alias in node.names]
                    continue
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    mods = modules(package)
    return {m: {t for t, _ in imports(m, p, set(mods)) if t in mods and t != m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle (a -> b -> ... -> a) for each group of modules that import each other (Tarjan's strongly
    connected components)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(graph, set(group)) for group in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in {group}")


def test_the_cycle_finder_finds_circles_by_hand():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_pixart_core_never_imports_comfy():
    """Every module of pixart_core imported in a Python that cannot find ComfyUI: none imports it (and none needs it)."""
    code = (f"import sys, {', '.join(modules('pixart_core'))}; bad=[m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(COMFYUI_NAMES)}]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=CLEAN_ENV)  # `-c` imports from cwd


def test_no_import_of_comfyui_anywhere_in_pixart_core():
    """Also the imports inside functions, which importing the modules does not run."""
    assert {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "latent_preview", "utils"} <= COMFYUI_NAMES
    mods = modules("pixart_core")
    bad = [f"{p.relative_to(REPO)}:{line} imports {target}" for m, p in mods.items()
           for target, line in imports(m, p, set(mods))
           if target.split(".")[0] in COMFYUI_NAMES or target.startswith("(above")]
    assert not bad, "pixart_core must not import ComfyUI:\n" + "\n".join(bad)


def test_package_imports_outside_comfyui(tmp_path):
    (tmp_path / "pixart_pack").symlink_to(REPO, target_is_directory=True)
    code = "import sys, pixart_pack; assert callable(pixart_pack.comfy_entrypoint); assert 'comfy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=CLEAN_ENV)


def test_no_import_circle_in_pixart_core():
    found = cycles(import_graph("pixart_core"))
    assert not found, "import circles in pixart_core (function-level imports included):\n" + "\n".join(
        " -> ".join(c) for c in found)


def test_what_the_t5_loaders_share_is_a_leaf():
    """t5_spec (what the loaders share) imports none of the T5 loaders, and none of them imports the loader t5."""
    graph = import_graph("pixart_core")
    loaders = {f"pixart_core.{m}" for m in ("t5", "t5_cache", "t5_quantize", "gguf_t5", "t5_formats")}
    assert loaders <= set(graph), sorted(loaders - set(graph))
    assert not graph["pixart_core.t5_spec"] & loaders, graph["pixart_core.t5_spec"]
    assert all("pixart_core.t5" not in graph[m] for m in loaders - {"pixart_core.t5"}), {m: graph[m] for m in loaders}


def test_no_file_over_400_lines_in_pixart_core_and_nodes():
    long = [f"{p.relative_to(REPO)}: {n} lines" for package in ("pixart_core", "nodes")
            for p in modules(package).values() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_80_lines_in_pixart_core_and_nodes():
    long = []
    for package in ("pixart_core", "nodes"):
        for path in modules(package).values():
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_test_file_is_in_a_tier_folder():
    stray = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in TIERS]
    assert not stray, f"test files outside tests/{{{','.join(TIERS)}}}: {stray}"


def test_no_test_file_imports_another():
    """Shared helpers live in harness/, tests/cases.py, tests/reference_settings.py or conftest.py, so a test file
    can move without breaking another."""
    tests = {p.stem for p in TESTS.rglob("test_*.py")}
    bad = [f"{p.relative_to(TESTS)}:{line} imports {target}" for p in sorted(TESTS.rglob("*.py"))
           for target, line in imports(p.stem, p, set()) if target.split(".")[0] in tests]
    assert not bad, "\n".join(bad)

"""One place for ComfyUI's internals: only nodes/comfy/ imports ComfyUI's modules (the node modules import ComfyUI's
versioned node API, comfy_api, and nothing else of ComfyUI; pixart_core nothing of it, which core/test_structure.py
checks), and the header of nodes/comfy/__init__.py lists exactly the ComfyUI names that package reaches, each one
present in this ComfyUI.

ComfyUI's module names come from its own folder (COMFY), never from the pack."""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from conftest import COMFY, REPO
from harness import location

NODES = REPO / "nodes"
PACKAGE = NODES / "comfy"
HEADER = PACKAGE / "__init__.py"
OBJECTS_HEADING = "Attributes of ComfyUI objects"
GROUP = re.compile(r"^([A-Za-z_][\w.]*)$")  # a module (first list) or a class (second list)
ENTRY = re.compile(r"^    (\S+)\s+(public|private)\s")  # one of its attributes


def comfyui_modules() -> set[str]:
    """The top-level modules ComfyUI's folder provides (its nodes.py, folder_paths.py, comfy/, ...), except its
    versioned node API comfy_api."""
    names = location.comfyui_modules(COMFY)
    assert {"comfy", "folder_paths", "latent_preview", "nodes", "comfy_api"} <= names, f"not a ComfyUI: {COMFY}"
    return names - {"comfy_api"}


def absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, in functions too; relative imports are the pack's own."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def comfyui_imports(paths: list[Path], allowed: tuple[str, ...] = ()) -> list[str]:
    comfyui = comfyui_modules() | {"comfy_api"}
    return [f"{p}:{line} imports {module}" for p in paths for line, module in absolute_imports(p)
            if module.split(".")[0] in comfyui and module.split(".")[0] not in allowed]


def test_only_nodes_comfy_imports_comfyui_internals():
    outside = [p for p in sorted(NODES.rglob("*.py")) if PACKAGE not in p.parents]
    assert len(outside) > 5 and NODES / "sampler.py" in outside
    assert comfyui_imports(outside, allowed=("comfy_api",)) == []  # pixart_core: core/test_structure.py


def header() -> tuple[dict[str, str], dict[str, str]]:
    """({module attribute: kind}, {object attribute: kind}) as the package's header lists them."""
    doc = ast.get_docstring(ast.parse(HEADER.read_text()))
    modules, objects = doc.split(OBJECTS_HEADING)
    return _entries(modules), _entries(objects)


def _entries(text: str) -> dict[str, str]:
    """{owner.attribute: kind} of one list."""
    found, owner = {}, None
    for line in text.splitlines():
        if GROUP.match(line):
            owner = line
        elif (m := ENTRY.match(line)) is not None:
            assert owner is not None, f"an entry before any module or class: {line}"
            found[f"{owner}.{m[1]}"] = m[2]
    return found


def reached(path: Path) -> tuple[set[str], set[str]]:
    """(the dotted names a module of the package reaches in ComfyUI's modules and PyTorch's private ones, the
    modules it imports): `mm.load_models_gpu` with `import comfy.model_management as mm` is
    comfy.model_management.load_models_gpu; `args.fp32_unet` with `from comfy.cli_args import args` is
    comfy.cli_args.args.fp32_unet."""
    tree = ast.parse(path.read_text(), str(path))
    roots = comfyui_modules() | {"torch"}
    names, modules = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in roots:
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    parts = a.name.split(".")
                    modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in roots:
            modules.add(node.module)
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    chains = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            chain = [names[node.id]]
            while isinstance(parent.get(node), ast.Attribute):
                node = parent[node]
                chain.append(node.attr)
            dotted = ".".join(chain)
            if not dotted.startswith("torch.") or "._" in dotted:  # PyTorch: only its private names
                chains.add(dotted)
    return chains, modules


def test_header_lists_exactly_what_the_package_reaches():
    listed, _ = header()
    assert len(listed) > 20
    chains, modules = set(), set()
    for path in sorted(PACKAGE.glob("*.py")):
        c, m = reached(path)
        chains |= c
        modules |= m
    assert "comfy.model_management.load_models_gpu" in chains and "comfy.model_management" in modules
    broad = sorted(e for e in listed if e in modules)
    assert broad == [], "list names, not whole modules"

    def covered(chain: str) -> bool:
        return any(chain == e or chain.startswith(e + ".") for e in listed)

    assert sorted(c for c in chains if not covered(c)) == [], "used in nodes/comfy/, missing from its header"
    assert sorted(e for e in listed if not any(c == e or c.startswith(e + ".") for c in chains)) == [], \
        "listed in the header of nodes/comfy/, used nowhere"


def test_header_object_attributes_are_used():
    _, objects = header()
    assert len(objects) > 10
    words = set()
    for path in sorted(NODES.rglob("*.py")):
        if path == HEADER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                words.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                words.add(node.value)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                words.add(node.name)
    assert sorted(e for e in objects if e.rsplit(".", 1)[1] not in words) == [], \
        "listed in the header of nodes/comfy/, used nowhere"


def resolve(dotted: str):
    """The object a dotted name names: its longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def has_attribute(cls: type, name: str) -> bool:
    """A class attribute or method, or an instance attribute its constructor (or any method) sets on self."""
    if hasattr(cls, name):
        return True
    for base in inspect.getmro(cls):
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*=", source):
            return True
    return False


def test_header_names_exist_in_this_comfyui(comfy):
    listed, objects = header()
    missing = []
    for dotted in listed:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as e:
            missing.append(f"{dotted}: {e}")
    for dotted in objects:
        owner, name = dotted.rsplit(".", 1)
        cls = resolve(owner)
        if not (inspect.isclass(cls) and has_attribute(cls, name)):
            missing.append(f"{dotted}: no attribute {name} on {owner}")
    assert missing == []


@pytest.mark.parametrize("stray", ["import folder_paths", "from comfy.model_management import get_torch_device",
                                   "import comfy_extras.nodes_custom_sampler", "from nodes import CLIPLoader"])
def test_a_stray_import_is_caught(tmp_path, stray):
    """The check above sees an import of ComfyUI anywhere in a node module, inside a function too."""
    module = tmp_path / "stray.py"
    module.write_text(f"from comfy_api.v0_0_2 import io\nfrom .comfy import loading\n\n\ndef f():\n    {stray}\n")
    assert comfyui_imports([module], allowed=("comfy_api",)) == [f"{module}:6 imports {stray.split()[1]}"]

#!/usr/bin/env python3
"""List mutmut's surviving mutants with their one-line diffs, grouped by category (for tests/MUTATION.md).

    .venv/bin/python scripts/mutation_survivors.py > /tmp/survivors.md   # after ./scripts/mutation

Categories are a first sort by what the changed line is; each one is still read by hand before it goes into
tests/MUTATION.md."""
from __future__ import annotations

import ast
import difflib
import json
import re
from collections import defaultdict
from pathlib import Path

MUTANTS = Path(__file__).resolve().parents[1] / "mutants"


def functions(path: Path) -> dict[str, str]:
    src = path.read_text()
    tree = ast.parse(src)
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            out[node.name] = ast.get_source_segment(src, node)
    return out


def category(old: str, new: str) -> str:
    if re.search(r"(raise|log\.\w+|Error)\(", old) and ("None)" in new or "XX" in new) or re.match(r'^\s*f?"', old):
        return "message text"
    if "XX" in new or new.upper() == new and old.upper() == new or new.lower() == new and old.lower() == new:
        return "message text" if re.search(r"(raise|log\.|Error|warning)", old) else "string literal"
    return "code"


def main() -> None:
    by_file: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for meta in sorted((MUTANTS / "pixart_core").glob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        funcs = functions(meta.with_suffix(""))
        for key, code in codes.items():
            if code != 0:
                continue
            mangled = key.rsplit(".", 1)[1]
            orig = funcs.get(mangled.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
            mutant = funcs.get(mangled, "")
            a = orig.splitlines()[1:]
            b = mutant.splitlines()[1:]
            old = [l[1:].strip() for l in difflib.ndiff(a, b) if l.startswith("- ")]
            new = [l[1:].strip() for l in difflib.ndiff(a, b) if l.startswith("+ ")]
            o, n = " / ".join(old), " / ".join(new)
            by_file[meta.name[:-5]].append((key.split(".x_", 1)[1], category(o, n), o, n))
    for name, rows in by_file.items():
        print(f"### {name}: {len(rows)} survivors\n")
        for mutant, cat, o, n in sorted(rows, key=lambda r: (r[1], r[0])):
            print(f"- `{mutant}` ({cat}): `{o[:110]}` → `{n[:110]}`")
        print()


if __name__ == "__main__":
    main()

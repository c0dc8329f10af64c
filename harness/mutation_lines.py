"""Line-level test selection for the mutation run (harness/mutation.py).

mutmut runs, for each mutant, every test that called the mutated function. A test that never executes the statement
the mutant changes cannot tell the mutant from the original (everything before that statement runs the same), so a
survivor would run it for nothing: with the node tests (a whole graph each) that is minutes per survivor. During
mutmut's stats run coverage.py records which test executed which line of the mutated files; a mutant's child then
runs only the tests that executed a line of a statement it changes. A change in the function's signature (a default)
or one that moves lines keeps every test. A test the record does not know is kept.

Line numbers are those of the mutated copy under mutants/, which mutmut writes again whenever the source changes; a
later stats run re-runs only the tests that are new. So the record keeps, per file, the hash of the copy it was
measured on and the tests measured on it: when the copy changes, what the earlier tests recorded of it is dropped
(they are then unknown for that file, so kept), and a file whose copy no longer matches its record keeps every test.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from . import location

RECORD = "mutmut-lines.json"  # in mutants/, beside mutmut's own mutmut-stats.json
_PACKAGES = ("pixart_core", "nodes")


def source_file(filename: str, root: Path) -> str | None:
    """The file's path in the checkout (`nodes/text.py`), from a code object's filename: the copy under `root` that
    the core tests import, or the pack ComfyUI loaded from custom_nodes/ (a link to `root`)."""
    marker = f"/{location.PACK}/"
    if marker in filename:
        rel = filename.split(marker, 1)[1]
    else:
        try:
            rel = str(Path(os.path.abspath(filename)).relative_to(root))
        except ValueError:
            return None
    return rel if rel.split("/")[0] in _PACKAGES and rel.endswith(".py") else None


class Recorder:
    """coverage.py over the pack's files, one dynamic context per test (its setup, call and teardown)."""

    def __init__(self, root: Path):
        import coverage

        self.root = root
        self.tests: list[str] = []
        self.cov = coverage.Coverage(data_file=None, config_file=False, include=[
            f"{root}/{p}/*" for p in _PACKAGES] + [f"*/{location.PACK}/{p}/*" for p in _PACKAGES])
        self.cov.start()

    def test(self, nodeid: str) -> None:
        self.tests.append(nodeid)
        self.cov.switch_context(nodeid)

    def between(self) -> None:
        self.cov.switch_context("")

    def save(self) -> None:
        """Merge into mutants/mutmut-lines.json (see merged)."""
        self.cov.stop()
        data = self.cov.get_data()
        measured: dict[str, dict[str, set[str]]] = {}
        for filename in data.measured_files():
            rel = source_file(filename, self.root)
            if rel is None:
                continue
            for line, contexts in data.contexts_by_lineno(filename).items():
                measured.setdefault(rel, {}).setdefault(str(line), set()).update(c for c in contexts if c)
        path = self.root / RECORD
        old = json.loads(path.read_text()) if path.exists() else {}
        files = set(measured) | set(old.get("files", {}))
        hashes = {rel: file_hash(self.root / rel) for rel in files if (self.root / rel).exists()}
        path.write_text(json.dumps(merged(old, set(self.tests), measured, hashes)))


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merged(old: dict, ran: set[str], measured: dict[str, dict[str, set[str]]], hashes: dict[str, str]) -> dict:
    """The record after a stats session: per file (path in the checkout), the hash of the mutated copy the lines
    were measured on, the tests measured on it and, per line, the tests that executed it. `ran` are the session's
    tests, `measured` their lines, `hashes` the copies now. The tests that ran replace what they recorded before;
    on a copy that changed since, only the tests that ran now are known."""
    out = {}
    for rel, digest in hashes.items():
        entry = old.get("files", {}).get(rel, {})
        same = entry.get("hash") == digest
        lines = {line: set(t) - ran for line, t in entry.get("lines", {}).items()} if same else {}
        for line, tests in measured.get(rel, {}).items():
            lines.setdefault(line, set()).update(tests)
        known = (set(entry.get("tests", ())) if same else set()) | ran
        out[rel] = {"hash": digest, "tests": sorted(known),
                    "lines": {line: sorted(t) for line, t in lines.items() if t}}
    return {"files": out}


def _file_of(module: str, root: Path) -> str:
    rel = module.replace(".", "/")
    return f"{rel}.py" if (root / f"{rel}.py").exists() else f"{rel}/__init__.py"


def _spans(function: ast.FunctionDef) -> list[tuple[int, int, ast.AST]]:
    """(first, last line, node) of every statement in the function: a compound statement's header only."""
    out = []
    for node in ast.walk(function):
        if not isinstance(node, (ast.stmt, ast.ExceptHandler)) or node is function:
            continue
        body = getattr(node, "body", None)
        last = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
        out.append((node.lineno, max(last, node.lineno), node))
    return out


def changed_statements(source: str, mutant: str) -> list[tuple[int, int]] | None:
    """The line spans (in the original function, `x_f__mutmut_orig`) of the statements mutant `x_f__mutmut_N`
    changes; None when the change is in the signature or the two differ in length."""
    found = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    orig = found.get(mutant.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mut = found.get(mutant)
    if orig is None or mut is None:
        return None
    a = ast.get_source_segment(source, orig).splitlines()
    b = ast.get_source_segment(source, mut).splitlines()
    if len(a) != len(b):
        return None
    changed = [i for i in range(1, len(a)) if a[i] != b[i]]
    if not changed or a[0].replace(orig.name, "", 1) != b[0].replace(mut.name, "", 1):
        return None
    body_start = orig.body[0].lineno - orig.lineno
    if any(i < body_start for i in changed):  # a multi-line signature
        return None
    spans = _spans(orig)
    out = []
    for i in changed:
        line = orig.lineno + i
        inner = [(lo, hi) for lo, hi, _ in spans if lo <= line <= hi]
        if not inner:
            return None
        out.append(min(inner, key=lambda s: s[1] - s[0]))
    return out


def tests_for(mutant_name: str, root: Path) -> tuple[set[str], set[str]] | None:
    """(tests that executed a statement the mutant changes, every test the record knows for its file), or None: run
    them all (no record, a copy changed since it was measured, or a change the lines cannot place)."""
    path = root / RECORD
    if not path.exists():
        return None
    module, _, mangled = mutant_name.rpartition(".")
    rel = _file_of(module, root)
    entry = json.loads(path.read_text()).get("files", {}).get(rel)
    if entry is None or entry["hash"] != file_hash(root / rel):
        return None
    spans = changed_statements((root / rel).read_text(), mangled)
    if spans is None:
        return None
    tests = set()
    for lo, hi in spans:
        for line in range(lo, hi + 1):
            tests.update(entry["lines"].get(str(line), ()))
    return tests, set(entry["tests"])

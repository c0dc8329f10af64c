#!/usr/bin/env python3
"""tests/MUTATION.md from the mutation runs' results and the survivors' classification (scripts/mutation_survivors.toml).

mutants/ (mutmut's own result files) is git-ignored and lives only in the checkout that ran it, so each --write also
keeps a summary per module in tests/mutation_results.json (committed): the counts, the survivors with their changed
lines, the last run, and a result letter and time per mutant with mutmut's hash of its function. A later run in a
fresh checkout keeps the stored results of every function whose hash is unchanged and that it did not run again; a
module it did not run keeps its summary as it was, with its own date and commit. (Modules summarised before the
per-mutant letters were kept are replaced whole by a run that reaches them.)

    .venv/bin/python scripts/mutation_report.py --write    # tests/MUTATION.md
    .venv/bin/python scripts/mutation_report.py --table    # the per-module table only (scripts/mutation prints it)

Every surviving mutant is listed with its one-line change and the kind the classification file gives it (the first
entry whose pattern matches its name and whose `old` text, if given, is in the changed line); one that no entry
matches is listed as unclassified. mutmut's status names are kept (killed, timeout, survived, no tests, ...)."""
from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import re
import sys
import tomllib
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
CLASSIFICATION = ROOT / "scripts" / "mutation_survivors.toml"
OUT = ROOT / "tests" / "MUTATION.md"
STORE = ROOT / "tests" / "mutation_results.json"
# mutmut 3.8's exit codes (mutmut.stats.status_by_exit_code), read here without importing mutmut
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 2: "interrupted", None: "not checked",
          34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}
COLUMNS = ["killed", "timeout", "survived", "no tests", "not checked"]
LATER = "test added after the run"  # a survivor a test written since the run kills (seen by hand, not by mutmut)
INTRO = """
# Mutation testing

Written by `scripts/mutation_report.py` from the results in `mutants/` and the summaries of earlier runs kept in
`tests/mutation_results.json` (do not edit either by hand: run `./scripts/mutation_report.py --write`). The survivors'
classification is `scripts/mutation_survivors.toml`.

`./scripts/mutation` runs [mutmut](https://github.com/boxed/mutmut) 3.8.1 over the modules in pyproject.toml's
`[tool.mutmut]` `only_mutate`: pixart_core's second-wave modules and every module of `nodes/`. Each mutant (one small
change: an operator, a number, a string, a removed argument, a negated condition, ...) runs the tests that cover the
mutated function (mutmut records which tests call which function in a first run), narrowed here to the tests that
executed a statement the mutant changes (`harness/mutation_lines.py`: coverage.py records each test's lines in that
first run; a test that never executes the changed statement cannot tell the mutant from the original; lines measured
on an older mutated copy of the file are not used); it is *killed* when one fails, *no tests* when no test executed
the changed statement.

## What runs against the mutants

The core tier (`tests/core`) and the nodes tier (`tests/nodes`, which starts ComfyUI in the test process), without the
tests marked `slow`, without `tests/core/test_structure.py` and `tests/nodes/test_comfy_boundary.py` (they read the
source files, which mutmut rewrites) and without the e2e tier (servers, browsers, installs).

mutmut runs every pytest session of a run in one process tree: its first runs in its own process, then one forked
child per mutant. `harness/mutation.py`, a pytest plugin the run loads (`-p harness.mutation`), makes the tests that
start ComfyUI count there:
- mutmut names a mutant after its file (`nodes.text.x_f__mutmut_3`) and switches it on in the function whose module
  has that name; ComfyUI imports the pack under its folder's path (`/base/custom_nodes/pixart_sigma_nodes.nodes.text`).
  Without the plugin no test that goes through ComfyUI is ever recorded as covering a function, and no mutant is
  switched on inside ComfyUI. The plugin gives the pack's trampolines the file's module name.
- ComfyUI is initialised once per process (its folder_paths keeps the first base directory): the forked children
  inherit it started; each session moves ComfyUI's folders to its own base directory (`harness.comfyui.init_comfy`),
  the tiny models written once and copied.
- custom_nodes/ links to mutmut's copy of the checkout (`mutants/`, where mutmut runs the tests), so ComfyUI loads
  the mutated `nodes/` and `pixart_core/`; the plugin stops the run if it loaded the pack from anywhere else.
- Each session and each test starts as in a fresh process: the pack's caches (the embedding cache, functools caches),
  the models ComfyUI holds, its file lists and the executor's outputs of earlier tests are cleared (filled by
  mutmut's process without the mutant, they would hand a child the unmutated result; and mutmut runs a mutant's
  tests fastest first, not in the suite's order).
- torch's global switches as each tier sets them: importing ComfyUI lets SDPA's math kernel reduce in fp16/bf16; a
  core test run after a node test gets the switch back as it was before ComfyUI (the DiT memory test measures it).
- `OMP_NUM_THREADS=1` (set by `scripts/mutation`): torch's OpenMP pool in mutmut's process makes a forked child hang in
  its first parallel operation until mutmut's CPU-time limit, a "timeout" that no test earned.

Checks of the setup: a mutant of `nodes/scheduler_labels.py` is killed by the node tests (`nodes/` is reached only
through ComfyUI); the same mutant file edited back to the original code survives all 97 node tests that cover the
function, run in a forked child with another child beside it (no kill comes from the setup itself).

Functions that run only while a module is imported (the scheduler table's builder) run before mutmut forks the child,
so their mutants are switched on only where a test calls them again (`tests/core/test_release_settings.py` does).
"""


def only_mutate() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def modules() -> dict[str, dict]:
    """{'pixart_core/lora.py': {mutant name: exit code}} for every file [tool.mutmut] mutates."""
    out = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        rel = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        if any(fnmatch.fnmatch(rel, p) for p in only_mutate()):
            out[rel] = json.loads(meta.read_text())
    return out


def status(code) -> str:
    return STATUS.get(code, "suspicious")


def functions(path: Path) -> dict[str, str]:
    """The mutated file's functions (originals and mutants) by name."""
    src = path.read_text()
    lines = src.splitlines()  # sliced by line numbers: ast.get_source_segment splits the whole file on every call
    return {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in n.name}


def change(funcs: dict[str, str], name: str) -> tuple[str, str]:
    """The mutant's changed lines: (original, mutated), each joined with ' / '."""
    mangled = name.rsplit(".", 1)[1]
    unnamed = lambda src: [re.sub(r"def \w+\(", "def (", l, count=1) if i == 0 else l  # noqa: E731
                           for i, l in enumerate(src.splitlines())]  # the signature too (a default's mutants)
    orig = unnamed(funcs.get(mangled.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", ""))
    mutant = unnamed(funcs.get(mangled, ""))
    diff = list(difflib.ndiff(orig, mutant))
    return (" / ".join(l[2:].strip() for l in diff if l.startswith("- ")),
            " / ".join(l[2:].strip() for l in diff if l.startswith("+ ")))


def declared(module: dict, patterns: list[str]) -> int:
    """How many of a module's mutants are in declaration functions (the classification file's [declarations]) and
    not run."""
    return sum(f["codes"].count(".") for func, f in module.get("functions", {}).items()
               if any(fnmatch.fnmatchcase(func, p) for p in patterns))


def classify(rules: list[dict], name: str, old: str) -> tuple[str, str]:
    for rule in rules:
        patterns = rule["match"] if isinstance(rule["match"], list) else [rule["match"]]
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) and rule.get("old", "") in old:
            return rule["kind"], rule["reason"]
    return "unclassified", ""


def runs() -> list[dict]:
    """The invocations logged in mutants/ (scripts/mutation), in the store's form."""
    log = MUTANTS / "mutation-runs.jsonl"
    out = []
    for line in (log.read_text().splitlines() if log.exists() else []):
        if line.strip():
            r = json.loads(line)
            out.append({"start": r["start"][:16].replace("T", " "), "minutes": round(seconds(r["start"], r["end"]) / 60, 1),
                        "commit": r["commit"], "uncommitted": len(r["uncommitted"]), "workers": r["children"],
                        "names": r["names"], "end": r["end"][:16].replace("T", " ")})
    return out


def module_name(rel: str) -> str:
    return rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def last_run(rel: str, log: list[dict]) -> dict | None:
    """The last logged invocation that named some of this module's mutants (or ran everything)."""
    mod = module_name(rel)
    for run in reversed(log):
        if not run["names"] or any(n.startswith(mod + ".") for n in run["names"]):
            return run
    return None


def seconds(t0: str, t1: str) -> float:
    f = "%Y-%m-%dT%H:%M:%SZ"
    return (datetime.strptime(t1, f) - datetime.strptime(t0, f)).total_seconds()


LETTER = {"killed": "K", "timeout": "T", "survived": "S", "no tests": "N", "not checked": "."}  # the store's codes
STATUS_OF = {v: k for k, v in LETTER.items()} | {"O": "other"}


def per_function(meta: dict, kept: dict | None) -> dict[str, dict]:
    """{function: {"hash", "codes": one letter per mutant (LETTER; O = other), "seconds": one figure per mutant}} from
    mutants/' meta, with the results `kept` (the store's functions of the module) holds for the mutants this checkout
    has not run where the function is unchanged (same hash as mutmut computed it)."""
    out: dict[str, dict] = {}
    for key, code in meta["exit_code_by_key"].items():
        func, num = key.rsplit(".", 1)[1].rsplit("__mutmut_", 1)
        entry = out.setdefault(func, {"hash": meta.get("hash_by_function_name", {}).get(func, ""), "codes": {},
                                      "seconds": {}})
        entry["codes"][int(num)] = LETTER.get(status(code), "O")
        entry["seconds"][int(num)] = round(meta.get("durations_by_key", {}).get(key) or 0.0, 1)
    for func, entry in out.items():
        prev = (kept or {}).get(func)
        same = prev is not None and prev["hash"] == entry["hash"] != ""
        for i, letter in enumerate(prev["codes"] if same else "", 1):
            if entry["codes"].get(i) == "." and letter != ".":
                entry["codes"][i], entry["seconds"][i] = letter, prev["seconds"][i - 1]
        n = max(entry["codes"])
        entry["codes"] = "".join(entry["codes"].get(i, ".") for i in range(1, n + 1))
        entry["seconds"] = [entry["seconds"].get(i, 0.0) for i in range(1, n + 1)]
    return dict(sorted(out.items()))


def summarize(results: dict[str, dict], log: list[dict], store: dict[str, dict]) -> dict[str, dict]:
    """{module: summary} for each module of mutants/ with at least one decided mutant, this checkout's results
    merged with the store's for unchanged functions: counts, mutant time, last run, every survived or no-tests
    mutant with its changed lines, and the per-function codes a later run merges with."""
    out = {}
    for rel, meta in results.items():
        kept = store.get(rel, {})
        rerun = survivors_rerun(meta, kept)
        if rerun is not None:
            out[rel] = rerun
            continue
        funcs = per_function(meta, kept.get("functions"))
        letters = "".join(f["codes"] for f in funcs.values())
        c = Counter(STATUS_OF[x] for x in letters)
        if not c["killed"] + c["timeout"] + c["survived"] + c["no tests"]:
            continue
        fresh = any(status(v) != "not checked" for v in meta["exit_code_by_key"].values())
        if not fresh and "functions" not in kept:
            continue  # a summary from before per-function codes were kept: nothing here to replace it with
        mutated = functions(MUTANTS / rel) if {"S", "N"} & set(letters) else {}
        found = [[f"{module_name(rel)}.{func}__mutmut_{i}", STATUS_OF[x],
                  *change(mutated, f"{module_name(rel)}.{func}__mutmut_{i}")]
                 for func, f in funcs.items() for i, x in enumerate(f["codes"], 1) if x in "SN"]
        run = last_run(rel, log)
        out[rel] = {"mutants": len(letters), "counts": {k: c[k] for k in COLUMNS}, "other": c["other"],
                    "seconds": round(sum(sum(f["seconds"]) for f in funcs.values())),
                    "last_run": f"{run.get('end', run['start'])} ({run['commit']})" if run else kept.get("last_run", "-"),
                    "survivors": found, "functions": funcs}
    return out


def survivors_rerun(meta: dict, kept: dict) -> dict | None:
    """A module whose stored summary predates per-function codes, where this checkout re-ran only some of its
    survivors (the function unchanged: each re-run mutant has the stored survivor's name): the stored summary with
    those mutants' new results in its counts (a killed one leaves the survivors; one already counted as killed stays
    so, which also makes a second report over the same results give the same). None where that does not apply."""
    decided = {k: status(v) for k, v in meta["exit_code_by_key"].items() if status(v) != "not checked"}
    listed = {s[0]: s for s in kept.get("survivors", [])}
    if "functions" in kept or not decided or len(meta["exit_code_by_key"]) != kept.get("mutants"):
        return None
    if any(k not in listed and now not in ("killed", "timeout") for k, now in decided.items()):
        return None  # a mutant the summary counts as killed that now is not: nothing here says how to recount it
    counts, other, survivors = dict(kept["counts"]), kept.get("other", 0), []
    for name, row in listed.items():
        now = decided.get(name, row[1])
        if now in ("survived", "no tests"):
            survivors.append([name, now, *row[2:]])
        counts[row[1]] -= 1
        if now in counts:
            counts[now] += 1
        else:
            other += 1
    return {**kept, "counts": counts, "other": other, "survivors": survivors}


def stored() -> dict:
    return json.loads(STORE.read_text()) if STORE.exists() else {"runs": [], "modules": {}}


def merged(results: dict[str, dict]) -> dict:
    """The store with this checkout's runs added and its modules' summaries replaced by those of mutants/; the
    modules mutmut mutates that no run has decided yet, with their mutant counts, under "not_run"."""
    store = stored()
    seen = {(r["start"], tuple(r["names"])) for r in store["runs"]}
    log = store["runs"] + [r for r in runs() if (r["start"], tuple(r["names"])) not in seen]
    modules = {**store["modules"], **summarize(results, log, store["modules"])}
    not_run = {rel: n for rel, n in store.get("not_run", {}).items() if rel not in modules}
    not_run.update({rel: len(meta["exit_code_by_key"]) for rel, meta in results.items() if rel not in modules})
    not_run = {rel: n for rel, n in not_run.items() if n}  # a module mutmut finds nothing to mutate in is no gap
    return {"runs": log, "modules": dict(sorted(modules.items())), "not_run": dict(sorted(not_run.items()))}


def classified(summary: dict, rules: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """[(mutant, kind, reason, old, new)] for a module's survivors."""
    rows = []
    for mutant, how, old, new in summary["survivors"]:
        kind, reason = classify(rules, mutant, old)
        rows.append((mutant.rsplit(".", 1)[1], kind, f"(no tests) {reason}".strip() if how == "no tests" else reason, old, new))
    return rows


def table(data: dict, rules: list[dict], declarations: list[str]) -> list[str]:
    """One row per module that has run: its counts, the survivors the classification explains, the raw kill rate."""
    rows = ["| module | mutants | " + " | ".join(COLUMNS) + " | declarations (not run) | other | survivors classified | "
            "tests added after the run | killed % (raw) | mutant time (s) | last run (UTC, commit) |",
            "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|---|---|---|"]
    for rel, m in data["modules"].items():
        c = dict(m["counts"])
        decided = c["killed"] + c["timeout"] + c["survived"] + c["no tests"]
        kinds = Counter(kind for _, kind, *_ in classified(m, rules))
        skipped = declared(m, declarations)
        c["not checked"] -= skipped
        rows.append(f"| {rel} | {m['mutants']} | " + " | ".join(str(c[k]) for k in COLUMNS) + f" | {skipped} "
                    f"| {m['other']} | {kinds['equivalent'] + kinds['not testable']} of {c['survived'] + c['no tests']} | "
                    f"{kinds[LATER]} | {100 * (c['killed'] + c['timeout']) / decided:.1f}% | {m['seconds']} | "
                    f"{m['last_run']} |")
    return rows


def report(data: dict, rules: list[dict], declarations: dict) -> str:
    lines = [INTRO.strip(), "", "## Runs", ""]
    lines += ["| start (UTC) | minutes | commit | uncommitted files | workers | mutants named |", "|---|---|---|---|---|---|"]
    for r in data["runs"]:
        names = ", ".join(f"`{n}`" for n in r["names"]) or "all"
        lines.append(f"| {r['start']} | {r['minutes']:.1f} | {r['commit']} | {r['uncommitted']} | {r['workers']} | "
                     f"{names} |")
    lines += ["", "## Results per module", "",
              "killed % (raw) = (killed + timeout) / (killed + timeout + survived + no tests); *not checked* = not run "
              "yet; mutant time = the seconds mutmut's workers spent on the module's mutants (summed over workers); "
              "survivors classified = survived and no-tests mutants that scripts/mutation_survivors.toml explains "
              "(equivalent or not testable; the rest are listed as unclassified below); tests added after the run = "
              "survivors a test written after the module's last run kills (each seen to fail with the change applied "
              "by hand; mutmut has not re-run them, so they still count as survivors in the raw rate); "
              "last run = the last run that named the module, and its commit; declarations (not run) = mutants of "
              "the functions below, left out by choice. A module whose row has *not checked* mutants was run in part.",
              "", "Declarations, not run: " + ", ".join(f"`{p}`" for p in declarations.get("functions", [])) + ". " +
              declarations.get("reason", ""), ""]
    lines += table(data, rules, declarations.get("functions", []))
    missing = data["not_run"]
    lines += ["", f"Not run yet ({len(missing)} modules, {sum(missing.values())} mutants): " +
              (", ".join(f"`{m}`" for m in missing) or "none") + "."]
    found = {rel: classified(m, rules) for rel, m in data["modules"].items() if m["survivors"]}
    kinds = sorted({k for rows in found.values() for _, k, *_ in rows})
    lines += ["", "## Survivors by kind", "", "| module | survivors | " + " | ".join(kinds) + " |",
              "|---|---|" + "---|" * len(kinds)]
    for rel, rows in found.items():
        c = Counter(k for _, k, *_ in rows)
        lines.append(f"| {rel} | {len(rows)} | " + " | ".join(str(c[k]) for k in kinds) + " |")
    lines += ["", "## Every survivor", ""]
    for rel, rows in found.items():
        lines += [f"### {rel}: {len(rows)}", ""]
        for mutant, kind, reason, old, new in sorted(rows, key=lambda r: (r[1], r[0])):
            lines.append(f"- **{kind}** `{mutant}`: `{old[:110]}` → `{new[:110]}`" + (f" — {reason}" if reason else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(ROOT)} and {STORE.relative_to(ROOT)}")
    ap.add_argument("--table", action="store_true", help="print the per-module table only")
    args = ap.parse_args()
    results = modules() if MUTANTS.exists() else {}
    if not results and not STORE.exists():
        sys.exit("no results in mutants/ and no tests/mutation_results.json: run ./scripts/mutation first")
    classification = tomllib.loads(CLASSIFICATION.read_text())
    rules, declarations = classification.get("survivor", []), classification.get("declarations", {})
    data = merged(results)
    if args.table:
        print("\n".join(table(data, rules, declarations.get("functions", []))))
        return
    text = report(data, rules, declarations)
    if args.write:
        OUT.write_text(text)
        STORE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

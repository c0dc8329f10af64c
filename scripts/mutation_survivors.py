#!/usr/bin/env python3
"""List mutmut's surviving mutants with their one-line diffs, grouped by category (for tests/MUTATION.md).

    .venv/bin/python scripts/mutation_survivors.py > /tmp/survivors.md   # after ./scripts/mutation

Each survivor gets the reason from RULES (written after reading every survivor of the recorded run); one that no
rule explains is marked "?"."""
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


# (function name prefix, substring of the original line or "" for any, reason); first match wins. Every survivor of
# the last run matched one of these after reading it; a new survivor that matches none shows as UNEXPLAINED.
RULES = [
    ("_nan_error", "", "M"), ("make_scheduler", "", "M"), ("check_pairing", "", "M"),
    ("load_t5", "check_keys", "M"), ("load_t5", "check_shapes", "M"), ("load_t5", "config_from_shapes(shapes", "M"),
    ("load_t5", "_from_pretrained(Path(tmp)", "M"), ("load_t5", "this is not a T5", "M"), ("load_t5", "Choose a", "M"),
    ("load_t5", "yet. Use", "M"), ("config_from_shapes", "this is", "M"), ("config_from_shapes", "Choose a", "M"),
    ("config_from_shapes", "e.g. t5xxl", "M"), ("config_from_shapes", "log.warning", "M"),
    ("load_vae", "check_keys", "M"), ("load_vae", "check_shapes", "M"), ("load_vae", "this is not a VAE", "M"),
    ("load_vae", "Choose sdxl_vae", "M"),
    ("_dpmpp_2m", "", "D"), ("_sa_solver", "", "D"), ("_ddim", "", "D"), ("_ddpm", "", "D"), ("_dmd", "", "D"),
    ("initial_noise", "", "D"), ("_decode_one", "return_dict", "D"), ("bnb_config", "", "D"),
    ("compute_dtype", "fp16_ok", "D"), ("config_from_shapes", "", "D"), ("load_tokenizer", "local_files_only", "O"),
    ("_from_pretrained", "local_files_only", "O"), ("_from_pretrained", "device_map", "C"), ("_x0", "", "C"),
    ("_from_pretrained", "missing", "T"), ("config_from_state_dict", "sample_size", "N"),
    ("config_from_state_dict", "force_upcast", "N"), ("config_from_state_dict", "", "D"),
    ("_ldm_to_diffusers", "", "B"), ("load_tokenizer", "spiece", "U"),
    ("", "", "B"),
]
REASONS = {
    "M": "message text only",
    "D": "equivalent: the value removed or changed to equals the library default",
    "B": "equivalent for every input the function can get (see MUTATION.md)",
    "C": "equivalent on a CPU-only machine (device placement)",
    "O": "equivalent offline (local folder, HF_HUB_OFFLINE=1)",
    "T": "equivalent with transformers 5 (never reports the tied embedding as missing)",
    "N": "not read by the pack (diffusers pipelines read it; the pack sets tiles and dtype itself)",
    "U": "not reachable offline (no sentencepiece-only T5 tokenizer without a model hub)",
}


def reason(function: str, old: str) -> str:
    for prefix, needle, code in RULES:
        if function.startswith(prefix) and needle in old:
            return code
    return "?"


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
            function = key.split(".x_", 1)[1].rsplit("__mutmut_", 1)[0]
            by_file[meta.name[:-5]].append((key.split(".x_", 1)[1], reason(function, o), o, n))
    counts = {name: {code: sum(r[1] == code for r in rows) for code in REASONS} for name, rows in by_file.items()}
    print("| file | survivors | " + " | ".join(REASONS) + " |")
    print("|---|---|" + "---|" * len(REASONS))
    for name, rows in by_file.items():
        print(f"| {name} | {len(rows)} | " + " | ".join(str(counts[name][c]) for c in REASONS) + " |")
    print()
    for code, text in REASONS.items():
        print(f"- {code}: {text}")
    print()
    for name, rows in by_file.items():
        print(f"### {name}: {len(rows)} survivors\n")
        for mutant, code, o, n in sorted(rows, key=lambda r: (r[1], r[0])):
            print(f"- {code} `{mutant}`: `{o[:100]}` → `{n[:100]}`")
        print()


if __name__ == "__main__":
    main()

"""Run the whole bench set (P1 text-to-image, P2 sampler overhead, P3 loading; optionally the profile) and collect
every table into bench/out/results.md (+ each script's JSON in bench/out/). Sized to finish in under 20 minutes on
a quiet 2-core CPU once the weights exist (building them the first time takes about a minute more).

    ./scripts/harness bench.run_all              # P1-P3
    ./scripts/harness bench.run_all --profile    # + bench/profile_forward.py (about 3 minutes more)
    ./scripts/harness bench.run_all --quick      # 2-block DiT, 1-block T5, 1 step, 1 repeat: checks the harness
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import measure, report, weights
from harness.location import REPO, child_env

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="also run profile_forward.py")
    ap.add_argument("--quick", action="store_true", help="tiny depth, 1 repeat: a harness check, not a measurement")
    ap.add_argument("--only", nargs="*", choices=["p1", "p2", "p3", "profile"], help="run only these parts")
    a = ap.parse_args()

    if a.quick:
        depth = ["--dit-layers", "2"]
        parts = {
            "p1": ["p1_text_to_image.py", *depth, "--t5-layers", "1", "--steps", "1", "--repeats", "1"],
            "p2": ["p2_sampler_overhead.py", *depth, "--steps", "1", "--repeats", "1"],
            "p3": ["p3_loading.py", *depth, "--t5-layers", "1", "--repeats", "1"],
            "profile": ["profile_forward.py", *depth, "--t5-layers", "1", "--repeats", "1"],
        }
        suffix = "_quick"
    else:
        parts = {
            "p1": ["p1_text_to_image.py", "--sizes", "256", "512", "--steps", "4", "2", "--repeats", "3", "2"],
            "p2": ["p2_sampler_overhead.py", "--size", "256", "--steps", "3", "--repeats", "2"],
            "p3": ["p3_loading.py", "--repeats", "3"],
            "profile": ["profile_forward.py", "--size", "256", "--repeats", "3"],
        }
        suffix = ""
    chosen = a.only or (["p1", "p2", "p3"] + (["profile"] if a.profile else []))
    t0 = time.perf_counter()
    measure.log("building / checking the weight set")
    weights.build(*((2, 1) if a.quick else (28, 2)))
    if a.quick:  # P2 uses the 2-block DiT with the 2-block-T5 set
        weights.build(2, 2)
    build_s = time.perf_counter() - t0
    wall: dict[str, float] = {}
    outputs: dict[str, Path] = {}
    for name in chosen:
        script, *args = parts[name]
        out = weights.OUT / f"{Path(script).stem}{suffix}.json"
        outputs[name] = out
        measure.log(f"running {script} {' '.join(args)}")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"bench.{Path(script).stem}", *args, "--out", str(out)], check=True,
                       cwd=str(REPO), env=child_env())
        wall[name] = time.perf_counter() - t
        measure.log(f"{script}: {wall[name] / 60:.1f} min")
    total = time.perf_counter() - t0

    m = report.machine()
    lines = [f"# Bench results{' (quick harness check, not a measurement)' if a.quick else ''}", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}",
             f"- date: {m['date']}; code: {m['git_head']}"
             + (f" + uncommitted changes in {len(m['uncommitted_in_measured_code'])} file(s) of pixart_core/nodes"
                if m["uncommitted_in_measured_code"] else ""),
             f"- versions: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
             f"transformers {m['transformers']}, ComfyUI {m['comfyui']}",
             f"- wall time: {total / 60:.1f} min in all (weights check/build {build_s / 60:.1f} min; "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + ")", ""]
    for name, path in outputs.items():
        data = json.loads(path.read_text())
        lines += [f"## {name}", "", data["markdown"], ""]
    md = weights.OUT / f"results{suffix}.md"
    md.write_text("\n".join(lines))
    report.write_json(weights.OUT / f"run_all{suffix}.json", {"machine": m, "wall_s": wall, "total_s": total,
                                                              "build_s": build_s, "outputs": {k: str(v) for k, v in outputs.items()}})
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Peak host memory while loading a full-size T5-v1.1-XXL encoder file with on-load quantization.

Writes a random-weight t5xxl_fp16.safetensors (4.76B parameters, 9.5 GB; streamed to disk tensor by tensor,
kept in bench/out/ for reuse), then loads it in a fresh subprocess per mode through pixart_core.t5.load_t5 and
samples the process's memory every 20 ms: VmRSS (all resident pages, including the memory-mapped file's page
cache) and RssAnon (memory the process itself allocated). Reports both as ratios to the loaded model's size.

    ./scripts/harness bench.t5_quantize_memory [--modes none,8bit,nf4] [--dtype bf16] [--layers 24]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import models
from harness.location import child_env

from .measure import MemoryPeak
from .report import print_table
from .weights import OUT


def worker(path: str, quantization: str, dtype: str) -> dict:
    """Load the T5 in this (fresh) process while a thread samples its memory every 20 ms."""
    import torch

    from pixart_core import t5 as ct5
    from pixart_core.quant import unique_bytes

    with MemoryPeak() as mem:
        t = time.perf_counter()
        loaded = ct5.load_t5(path, quantization, getattr(torch, dtype))
        seconds = time.perf_counter() - t
    base, peak = mem.base, mem.peak
    size = unique_bytes(loaded.model)
    return {"seconds": seconds, "model_bytes": size, "base": base, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="none,8bit,nf4")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the unquantized parts")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--file", default=None, help="an existing T5 safetensors file instead of the random one")
    ap.add_argument("--out", default=str(OUT / "t5_quantize_memory.json"))
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "QUANTIZATION", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    from pixart_core import t5_spec

    path = Path(a.file) if a.file else OUT / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    if not path.exists():
        t = time.perf_counter()
        models.write_t5_file(path, "full", layers=a.layers)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    names = {"none": t5_spec.QUANT_NONE, "8bit": t5_spec.QUANT_8BIT, "nf4": t5_spec.QUANT_NF4}
    rows = []
    gib = 2**30
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(path), names[mode], a.dtype],
                             capture_output=True, text=True, env=child_env())
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"{mode}: load failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["mode"] = mode
        r["rss_ratio"] = (r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / r["model_bytes"]
        r["anon_ratio"] = (r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / r["model_bytes"]
        rows.append(r)
    table = [{**r, "model_gib": r["model_bytes"] / gib, "rss_gib": (r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / gib,
              "anon_gib": (r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / gib} for r in rows]
    print_table(f"file {path.name}: {path.stat().st_size / gib:.2f} GiB; unquantized parts in {a.dtype}",
                [("mode", 6, "{mode}"), ("load s", 8, "{seconds:.1f}"), ("model GiB", 11, "{model_gib:.2f}"),
                 ("peak RSS GiB", 14, "{rss_gib:.2f}"), ("RSS/model", 11, "{rss_ratio:.2f}"),
                 ("peak anon GiB", 15, "{anon_gib:.2f}"), ("anon/model", 12, "{anon_ratio:.2f}")], table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"file": str(path), "dtype": a.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

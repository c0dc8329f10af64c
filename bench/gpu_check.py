"""The GPU check: one prepared run on one NVIDIA GPU that measures what the CPU test suite can only simulate, with
the pack's nodes inside ComfyUI (node class ids, ComfyUI's executor and model management). Writes one JSON
document after every part (--out) and prints a table at the end.

  (a) 8-bit and nf4 T5: peak VRAM of the first load and of a reload after ComfyUI unloaded everything, whether every
      8-bit layer holds one int8 copy; then ComfyUI frees part of the loaded T5 (model_management.free_memory ->
      ModelPatcher.partially_unload) and loads the DiT: the memory it counts as freed must leave the device, and
      the T5 must encode the same afterwards;
  (b) a whole 1024 px image (T5 -> DiT 20 steps -> VAE decode -> Preview, one API-format prompt through ComfyUI's
      executor) under caps of 12, 8 and 6 GiB with the T5 in 8-bit and in nf4: whether it ran, peak VRAM, seconds
      per node, what ComfyUI evicted or loaded partially, whether the VAE tiled. A cap is a ballast tensor that
      takes the rest of the card, so the driver's free memory and ComfyUI's get_free_memory see a card of that size;
  (c) P4 (bench/gpu.py's workers): seconds per 1024 px image, ours against diffusers, MFU and peak VRAM (bf16);
  (d) the SDPA kernels in the DiT's self- and cross-attention (torch profiler, one CFG-batched 1024 px step);
  (e) cosine of the 8-bit and nf4 T5 embeddings against the bf16 T5's (built in its own worker);
  (f) the 2K DiT at 1024 and 2048 (one sampler step) and the tiled refine at 3840x2160 (one step, four 2688x1536
      tiles): peak VRAM above the weights and seconds;
  (g) the 8-bit and nf4 T5 quantized into an empty quantized-T5 cache by the T5 Loader (on the GPU, tensor by
      tensor): seconds, peak VRAM, the share of bytes equal to bitsandbytes' own CPU quantization for three layers,
      and the second (cached) load's seconds.

Weights are random and full size, built on the GPU in the first worker (T5-v1.1-XXL's shapes with --t5-blocks of
its 24 blocks, the PixArt-Σ XL/2 1024 transformer, the SDXL VAE) and written once under bench/out/gpu_p4/. Every
part runs in worker processes of its own (bench/gpu_check_workers.py); this process never touches the GPU. A part
gets a timeout (its own, and never past --budget): one that runs out is stopped and recorded with what it had
measured, and the next part runs.

Estimated seconds on one H100 (ESTIMATE below; how: bench/RESULTS.md, "The GPU check on the lent machine"):
weights 75, reference 30, 8-bit 95, nf4 85, sdpa 20, P4 60, hires 35: about 400 s; --budget (450 s) stops there.

    bash bench/gpu_check.sh                          # everything (with the project's .venv)
    bash bench/gpu_check.sh --parts a,b --t5-blocks 12   # only (a) and (b), half of T5-XXL's blocks
    bash bench/gpu_check.sh --cpu-smoke              # every code path on the CPU with tiny models (no figures)
    bash bench/gpu_check_device.sh --out $OUT/gpu_check.json  # on the lent GPU machine, from .gpu_carry
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench import gpu, measure, weights
from bench.gpu_check_workers import QUANTS, WORKERS, t5_name
from bench.report import write_json
from harness import location

CAPS_GIB = (12, 8, 6)
LETTERS = "abcdefg"
# part: (the letters it serves, estimated seconds on one H100, its own timeout in seconds)
PARTS = {"weights": ("", 75, 240), "reference": ("e", 30, 120), "memory 8-bit": ("abeg", 95, 240),
         "memory nf4": ("abeg", 85, 240), "sdpa": ("d", 20, 120), "p4": ("c", 60, 240), "hires": ("f", 35, 150)}
ESTIMATE = {k: v[1] for k, v in PARTS.items()}
LOG_TAIL = 200_000  # characters of each worker's stderr kept in the workers' log


def run_worker(a, kind: str, timeout: float, *extra: str) -> dict:
    """A worker process; its last RESULT line (what it had measured, also when it timed out or failed), with
    error / timed_out / process_s. Its stderr's tail goes to the workers' log."""
    args = [sys.executable, "-m", "bench.gpu_check", "--worker", kind, "--base", str(a.base), "--t5", a.t5,
            "--t5-blocks", str(a.t5_blocks), "--size", str(a.size), "--steps", str(a.steps),
            "--caps", ",".join(map(str, a.caps)), "--do", a.do, *extra] + (["--cpu-smoke"] if a.cpu_smoke else [])
    t = time.perf_counter()
    timed_out = False
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=location.REPO,
                             env=location.child_env(PYTHONUNBUFFERED="1", TQDM_DISABLE="1"), start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the worker and anything it started
            except ProcessLookupError:
                pass
            stdout, _ = p.communicate()
        err.seek(0)
        stderr = err.read()
    with open(a.log, "a") as f:
        f.write(f"\n==== {kind} {' '.join(extra)} (rc {p.returncode}, {time.perf_counter() - t:.0f} s)\n")
        f.write(stderr[-LOG_TAIL:])
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    if timed_out:
        out.update(error=f"timed out after {timeout:.0f} s (what it had measured is kept)", timed_out=True)
    elif p.returncode or not lines:
        out["error"] = stderr[-2000:] or f"exit code {p.returncode}, no result"
        measure.log(f"{kind} {' '.join(extra)} failed:\n{stderr[-3000:]}")
    out["process_s"] = time.perf_counter() - t
    return out


def part_p4(a, timeout: float) -> dict:
    """(c) through bench/gpu.py's workers (ours, then diffusers), each in its own process."""
    p4 = SimpleNamespace(base=a.base, size=a.size, steps=a.steps, images=1 if a.cpu_smoke else 2,
                         cpu_smoke=a.cpu_smoke, timeout=timeout / 2)
    rows = []
    for system in ("ours", "diffusers"):
        try:
            rows.append(gpu.run_config(p4, system, "bf16"))
        except subprocess.TimeoutExpired:
            rows.append({"system": system, "config": "bf16", "error": f"timed out after {p4.timeout:.0f} s"})
    peak = None if a.cpu_smoke else gpu.peak_tflops(a.device_name, None)
    p4_table, medians = gpu.summarize(rows, peak, a.steps)
    out = {"rows": rows, "median_s_per_image": medians, "table": p4_table}
    if any("error" in r for r in rows):
        out["error"] = "; ".join(f"{r['system']}: {str(r['error'])[-300:]}" for r in rows if "error" in r)
    return out


def table(report: dict) -> str:
    rows = ["| part | what | result |", "|---|---|---|"]
    for q, m in report.get("memory", {}).items():
        if "error" in m:
            rows.append(f"| (a)(b)(e)(g) | T5 {q} | worker failed or timed out: {m['error'][-120:]!r} |")
        g = m.get("quantize")
        if g:
            rows.append(f"| (g) | T5 {q} quantized on {g['quantized_on']} into an empty cache, then read back | "
                        f"{g['first_s']:.1f} s (peak VRAM {g['peak_vram_gib'] or 0:.2f} GiB), cached "
                        f"{g['cached_s']:.1f} s; bytes equal to bitsandbytes' CPU quantization: "
                        f"{[round(v, 4) for v in g['equal_bytes_vs_cpu'].values()]} |")
        r = m.get("reload")
        if r:
            rows.append(f"| (a) | {q} T5 peak VRAM, first load / reload | {r['first_peak_gib']:.2f} / "
                        f"{r['reload_peak_gib']:.2f} GiB; int8 copies per layer {r['int8_copies_per_layer']} |")
        pu = m.get("partial_unload")
        if pu:
            same = pu.get("same_embeddings", {})
            returned = "n/a" if pu["returned"] is None else f"{pu['returned']:.2f}"
            rows.append(f"| (a) | {q} T5 partly unloaded by ComfyUI ({pu['asked_gib']:.2f} GiB asked), then the DiT "
                        f"| ComfyUI freed {pu['comfy_freed_gib']:.2f} GiB, the device got back "
                        f"{pu['torch_freed_gib']:.2f} GiB (x{returned}); uncounted on the device after "
                        f"{pu['uncounted_after_gib']:.2f} GiB; DiT loaded {pu.get('dit_loaded_gib') or 0:.2f} GiB; "
                        f"re-encode max diff {same.get('max_abs_diff', float('nan')):.3g} |")
        if m.get("cosine_vs_bf16"):
            rows.append(f"| (e) | T5 {q} cosine vs bf16 | {', '.join(f'{c:.4f}' for c in m['cosine_vs_bf16'])} |")
        for c in m.get("caps", []):
            what = f"1024 px image, T5 {q}, cap {c['cap_gib']} GiB" if c["cap_gib"] else f"image, T5 {q}, no cap"
            res = (f"ok, {c['seconds']:.1f} s, peak {c['peak_gib'] or 0:.2f} GiB, VAE tiled: {c['vae_tiled']}"
                   if c.get("ok") else f"failed: {c.get('error', 'blank image')[:100]}")
            rows.append(f"| (b) | {what} | {res} |")
    for k, v in report.get("p4", {}).get("median_s_per_image", {}).items():
        rows.append(f"| (c) | P4 s/image {k} | {v:.2f} |")
    sdpa = report.get("sdpa", {})
    for where, ks in sdpa.get("kernels", {}).items():
        rows.append(f"| (d) | {where} ({sdpa.get('dtype')}) | {', '.join(f'{k} x{n}' for k, n in ks.items()) or 'none seen'} |")
    hires = report.get("hires", {})
    for name, st in hires.get("stages", {}).items():
        peak = f"{st['activation_peak_gib']:.2f} GiB above {hires['weights_gib']:.2f} GiB of weights" \
            if st["activation_peak_gib"] is not None else "(CPU)"
        rows.append(f"| (f) | DiT forward {name} ({st['tiles']} tile(s)) | {st['seconds']:.2f} s, peak {peak} |")
    rows += ["", "| part | status | seconds | estimate (H100) |", "|---|---|---|---|"]
    for name, p in report.get("parts", {}).items():
        rows.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} | {ESTIMATE.get(name, '')} |")
    return "\n".join(rows)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(LETTERS), help="which of a,b,c,d,e,f,g to run (default all)")
    ap.add_argument("--t5-blocks", type=int, default=24, help="T5-XXL blocks to build (24 = the real model)")
    ap.add_argument("--caps", default=",".join(map(str, CAPS_GIB)), help="VRAM caps in GiB for (b)")
    ap.add_argument("--budget", type=float,
                    help="seconds for the whole run: no part starts after it, a running one is stopped at it "
                         "(default 450; 1800 with --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true", help="every code path on the CPU with tiny models")
    ap.add_argument("--out", type=Path, help="the JSON file (written after every part)")
    for hidden, kw in (("--worker", {"choices": list(WORKERS)}), ("--base", {}), ("--t5", {}),
                       ("--quant", {"choices": list(QUANTS)}), ("--do", {"default": LETTERS}),
                       ("--size", {"type": int, "default": 1024}), ("--steps", {"type": int, "default": 20})):
        ap.add_argument(hidden, help=argparse.SUPPRESS, **kw)
    a = ap.parse_args(argv)
    a.smoke = a.cpu_smoke
    a.budget = a.budget or (1800 if a.cpu_smoke else 450)
    a.caps = [] if a.cpu_smoke else [float(c) for c in str(a.caps).split(",") if c]
    return a


def main() -> None:
    a = parse()
    if a.worker:
        import torch

        torch.manual_seed(0)
        measure.emit(WORKERS[a.worker](a))
        return
    start = time.perf_counter()
    location.use()
    wanted = {x.strip() for x in a.parts.split(",") if x.strip()}
    if not wanted <= set(LETTERS):
        raise SystemExit(f"--parts: {sorted(wanted - set(LETTERS))} unknown; choose from {','.join(LETTERS)}")
    a.do = "".join(sorted(wanted))
    if a.cpu_smoke:
        a.size, a.steps, a.base = 64, 2, gpu.SMOKE_OUT
    else:
        a.base = gpu.OUT
    a.t5 = t5_name(a.t5_blocks, a.cpu_smoke)
    a.out = a.out or (weights.OUT / ("gpu_check_smoke.json" if a.cpu_smoke else "gpu_check.json"))
    a.log = a.out.with_name(a.out.stem + "_workers.log")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.log.write_text("")
    a.device_name = None
    report: dict = {"device": None, "t5_blocks": None if a.cpu_smoke else a.t5_blocks, "size": a.size,
                    "steps": a.steps, "caps_gib": a.caps, "parts_asked": a.do, "budget_s": a.budget, "memory": {},
                    "parts": {}, "skipped": []}
    try:
        from bench.report import machine

        report["machine"] = machine()
    except Exception as e:  # noqa: BLE001 - no git on the GPU machine: the rest still runs
        report["machine"] = {"error": str(e)}
    carry = location.REPO / ".gpu_carry" / "manifest.json"
    if carry.is_file():
        report["carry"] = sorted(json.loads(carry.read_text())["wheels"])

    plan = [("weights", lambda t: run_worker(a, "weights", t))]
    if "e" in a.do:
        plan.append(("reference", lambda t: run_worker(a, "reference", t)))
    if set("abeg") & wanted:
        plan += [(f"memory {q}", lambda t, q=q: run_worker(a, "memory", t, "--quant", q)) for q in QUANTS]
    if "d" in a.do:
        plan.append(("sdpa", lambda t: run_worker(a, "sdpa", t)))
    if "c" in a.do:
        plan.append(("p4", lambda t: part_p4(a, t)))
    if "f" in a.do:
        plan.append(("hires", lambda t: run_worker(a, "hires", t)))

    for name, run in plan:
        left = a.budget - (time.perf_counter() - start)
        if left < 15 or (name != "weights" and "error" in report["weights"]):
            report["skipped"].append(name)
            report["parts"][name] = {"status": "skipped (budget spent)" if left < 15 else "skipped (no weights)"}
            continue
        measure.log(f"{name} ... ({left:.0f} s of the budget left)")
        t = time.perf_counter()
        result = run(min(600 if a.cpu_smoke else PARTS[name][2], left))  # the CPU is slower: no part timeouts
        status = "timed out" if result.get("timed_out") else "failed" if "error" in result else "ok"
        report["parts"][name] = {"status": status, "seconds": time.perf_counter() - t}
        if name.startswith("memory "):
            report["memory"][name.split(" ", 1)[1]] = result
        else:
            report[name] = result
        if name == "weights":
            a.device_name = report["device"] = result.get("device")
        report["seconds"] = time.perf_counter() - start
        write_json(a.out, report)
    report["seconds"] = time.perf_counter() - start
    report["table"] = table(report)
    write_json(a.out, report)
    print(report["table"])
    if "p4" in report:
        print(report["p4"]["table"])
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    if failed:
        raise SystemExit(f"parts not ok: {failed} (see {a.out} and {a.log})")


if __name__ == "__main__":
    main()

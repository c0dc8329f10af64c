"""Peak host memory while loading a full-size T5-v1.1-XXL encoder file with on-load quantization.

Writes a random-weight t5xxl_fp16.safetensors (4.76B parameters, 9.5 GB; streamed to disk tensor by tensor,
kept in bench/out/ for reuse), then loads it in a fresh subprocess per mode through pixart_core.t5.load_t5 and
samples the process's memory every 20 ms: VmRSS (all resident pages, including the memory-mapped file's page
cache) and RssAnon (memory the process itself allocated). Reports both as ratios to the loaded model's size.

    .venv/bin/python bench/t5_quantize_memory.py [--modes none,8bit,nf4] [--dtype bf16] [--layers 24]
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D_MODEL, D_FF, HEADS, D_KV, VOCAB = 4096, 10240, 64, 64, 32128


def t5_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"shared.weight": (VOCAB, D_MODEL), "encoder.final_layer_norm.weight": (D_MODEL,)}
    for i in range(layers):
        b = f"encoder.block.{i}.layer."
        for p in "qkvo":
            s[f"{b}0.SelfAttention.{p}.weight"] = (HEADS * D_KV, D_MODEL)
        if i == 0:
            s[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (32, HEADS)
        s[f"{b}0.layer_norm.weight"] = (D_MODEL,)
        s[f"{b}1.DenseReluDense.wi_0.weight"] = (D_FF, D_MODEL)
        s[f"{b}1.DenseReluDense.wi_1.weight"] = (D_FF, D_MODEL)
        s[f"{b}1.DenseReluDense.wo.weight"] = (D_MODEL, D_FF)
        s[f"{b}1.layer_norm.weight"] = (D_MODEL,)
    return s


def write_random_t5(path: Path, layers: int) -> None:
    """A safetensors file written one tensor at a time (never the whole model in memory)."""
    import torch

    shapes = t5_shapes(layers)
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".part")
    g = torch.Generator().manual_seed(0)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k, shape in shapes.items():
            t = torch.ones(shape) if "layer_norm" in k else torch.randn(shape, generator=g) * 0.02
            f.write(t.half().numpy().tobytes())
    tmp.rename(path)


CHILD = r"""
import json, sys, threading, time, torch
sys.path.insert(0, {root!r})
from pixart_core import t5 as ct5
from pixart_core.quant import all_tensors

def mem():
    out = {{}}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmRSS", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out

peak = {{"VmRSS": 0, "RssAnon": 0}}
stop = False
def sample():
    while not stop:
        for k, v in mem().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
base = mem()
th = threading.Thread(target=sample, daemon=True); th.start()
t = time.perf_counter()
loaded = ct5.load_t5({path!r}, {quant!r}, getattr(torch, {dtype!r}))
seconds = time.perf_counter() - t
stop = True; th.join()
unique = {{(x.untyped_storage().data_ptr(), x.storage_offset(), x.numel()): x for _, x in all_tensors(loaded.model)}}
size = sum(x.numel() * x.element_size() for x in unique.values())
print(json.dumps({{"seconds": seconds, "model_bytes": size, "base": base, "peak": peak}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="none,8bit,nf4")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the unquantized parts")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--file", default=None, help="an existing T5 safetensors file instead of the random one")
    ap.add_argument("--out", default="bench/out/t5_quantize_memory.json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pixart_core import t5 as ct5

    path = Path(a.file) if a.file else ROOT / "bench" / "out" / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_random_t5(path, a.layers)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    names = {"none": ct5.QUANTIZATIONS[0], "8bit": ct5.QUANTIZATIONS[1], "nf4": ct5.QUANTIZATIONS[2]}
    rows = []
    for mode in a.modes.split(","):
        code = CHILD.format(root=str(ROOT), path=str(path), quant=names[mode], dtype=a.dtype)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"{mode}: load failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["mode"] = mode
        r["rss_ratio"] = (r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / r["model_bytes"]
        r["anon_ratio"] = (r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / r["model_bytes"]
        rows.append(r)
    gib = 2**30
    print(f"file {path.name}: {path.stat().st_size / gib:.2f} GiB; unquantized parts in {a.dtype}")
    print(f"{'mode':<6}{'load s':>8}{'model GiB':>11}{'peak RSS GiB':>14}{'RSS/model':>11}{'peak anon GiB':>15}{'anon/model':>12}")
    for r in rows:
        print(f"{r['mode']:<6}{r['seconds']:>8.1f}{r['model_bytes'] / gib:>11.2f}{(r['peak']['VmRSS'] - r['base']['VmRSS']) / gib:>14.2f}"
              f"{r['rss_ratio']:>11.2f}{(r['peak']['RssAnon'] - r['base']['RssAnon']) / gib:>15.2f}{r['anon_ratio']:>12.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"file": str(path), "dtype": a.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

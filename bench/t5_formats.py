"""A GGUF Q8_0 T5 next to the fp16 safetensors file it was made from: load time, memory, one encode.

Writes a random-weight T5-v1.1-XXL of full width (4096, d_ff 10240, 64 heads) with `--layers` blocks (default 4;
24 is the whole 9.5 GB model) as fp16 safetensors, then the same weights as a GGUF Q8_0 file (llama.cpp's tensor
names, gguf-py's Q8_0 quantizer), both kept in bench/out/. Each is loaded in a fresh subprocess through
pixart_core.t5.load_t5 (quantization none, compute dtype --dtype) while a thread samples VmRSS and RssAnon every
20 ms; then one prompt of --tokens tokens is encoded (twice; the second is timed). Reports both side by side and the
GGUF/fp16 ratios.

    ./scripts/harness bench.t5_formats [--layers 4] [--dtype bfloat16] [--tokens 32]
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


def write_gguf_from(fp16: Path, dest: Path) -> None:
    """The fp16 file's tensors as a GGUF Q8_0 T5 (norms F32, relative attention bias F16), one tensor at a time."""
    import gguf
    from safetensors import safe_open

    from harness.gguf_files import quantize, tensor_type

    with safe_open(str(fp16), "pt") as f:
        keys = list(f.keys())
        n_blocks = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.block."))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_blocks)
        tmp = dest.with_name(dest.name + ".part")
        w = gguf.GGUFWriter(str(tmp), "t5encoder")
        for k in keys:
            values = f.get_tensor(k).float().numpy()
            data, qtype = quantize(values, tensor_type(k, values.shape, "Q8_0"))
            w.add_tensor(names.get_name(k, try_suffixes=(".weight",)), data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    tmp.replace(dest)


def worker(path: str, dtype: str, tokens: int) -> dict:
    """Load the T5 in this (fresh) process while a thread samples its memory; then time one encode."""
    import torch

    from pixart_core import t5 as ct5
    from pixart_core.quant import unique_bytes

    with MemoryPeak() as mem:
        t = time.perf_counter()
        loaded = ct5.load_t5(path, "none", getattr(torch, dtype))
        seconds = time.perf_counter() - t
    base, peak = mem.base, mem.peak
    size = unique_bytes(loaded.model)
    ids = torch.arange(5, 5 + tokens).reshape(1, tokens)
    with torch.no_grad():
        loaded.model(input_ids=ids)
        t = time.perf_counter()
        loaded.model(input_ids=ids)
        encode = time.perf_counter() - t
    return {"seconds": seconds, "model_bytes": size, "base": base, "peak": peak, "encode_s": encode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(OUT / "t5_formats.json"))
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return
    fp16 = OUT / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    q8 = OUT / f"t5xxl_random_{a.layers}l-Q8_0.gguf"
    if not fp16.exists():
        models.write_t5_file(fp16, "full", layers=a.layers)
    if not q8.exists():
        t = time.perf_counter()
        write_gguf_from(fp16, q8)
        print(f"wrote {q8} in {time.perf_counter() - t:.0f} s")
    rows = []
    gib = 2**30
    for kind, path in (("fp16 safetensors", fp16), ("GGUF Q8_0", q8)):
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(path), a.dtype, str(a.tokens)],
                             capture_output=True, text=True, env=child_env())
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(f"{kind}: load failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(kind=kind, file_gib=path.stat().st_size / gib, model_gib=r["model_bytes"] / gib,
                 anon_gib=(r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / gib,
                 rss_gib=(r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / gib)
        rows.append(r)
    f16, q = rows
    ratio = {"kind": "GGUF / fp16", "file_gib": q["file_gib"] / f16["file_gib"], "seconds": q["seconds"] / f16["seconds"],
             "model_gib": q["model_gib"] / f16["model_gib"], "anon_gib": q["anon_gib"] / f16["anon_gib"],
             "rss_gib": q["rss_gib"] / f16["rss_gib"], "encode_s": q["encode_s"] / f16["encode_s"]}
    print_table(f"T5-XXL width, {a.layers} blocks, compute {a.dtype}, encode of {a.tokens} tokens",
                [("file", 18, "{kind}"), ("file GiB", 9, "{file_gib:.2f}"), ("load s", 8, "{seconds:.2f}"),
                 ("model GiB", 10, "{model_gib:.2f}"), ("peak anon GiB", 14, "{anon_gib:.2f}"),
                 ("peak RSS GiB", 13, "{rss_gib:.2f}"), ("encode s", 9, "{encode_s:.3f}")], [*rows, ratio])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"layers": a.layers, "dtype": a.dtype, "rows": rows, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()

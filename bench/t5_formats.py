"""GGUF T5 files next to the fp16 safetensors file they were made from: load time, memory, one encode.

Writes a random-weight T5-v1.1-XXL of full width (4096, d_ff 10240, 64 heads) with `--layers` blocks (default 4;
24 is the whole 9.5 GB model) as fp16 safetensors, then the same weights as a GGUF of each `--types` file type
(default Q8_0; llama.cpp's tensor names, each tensor in the type llama-quantize gives it in a 24-block file:
harness.gguf_files), all kept in bench/out/. Each is loaded in a fresh subprocess through pixart_core.t5.load_t5
(quantization none, compute dtype --dtype) while a thread samples VmRSS and RssAnon every 20 ms; then one prompt of
--tokens tokens is encoded (twice; the second is timed). Reports them side by side with the GGUF/fp16 ratios, and
the model size in memory extrapolated to 24 blocks: from the file layout (linear weights in their file types, the
rest in the compute dtype), which must match the measured size at --layers blocks.

    ./scripts/harness bench.t5_formats [--layers 4] [--dtype bfloat16] [--tokens 32] [--types Q8_0 Q3_K_M ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import models
from harness.gguf_files import layout_bytes
from harness.location import child_env

from .measure import MemoryPeak
from .report import print_table
from .weights import OUT


FULL_LAYERS = 24  # T5-v1.1-XXL's encoder blocks


def write_gguf_from(fp16: Path, dest: Path, file_type: str = "Q8_0") -> None:
    """The fp16 file's tensors as a GGUF T5 of `file_type` (each tensor typed as in a 24-block file of that type),
    one tensor at a time."""
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
            data, qtype = quantize(values, tensor_type(k, values.shape, file_type, FULL_LAYERS))
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


def _run(kind: str, path: Path, dtype: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(path), dtype, str(tokens)],
                         capture_output=True, text=True, env=child_env())
    if out.returncode:
        print(out.stderr[-2000:])
        raise SystemExit(f"{kind}: load failed")
    gib = 2**30
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(kind=kind, file_gib=path.stat().st_size / gib, model_gib=r["model_bytes"] / gib,
             anon_gib=(r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / gib,
             rss_gib=(r["peak"]["VmRSS"] - r["base"]["VmRSS"]) / gib)
    return r


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--types", nargs="+", default=["Q8_0"], help="GGUF file types (harness.gguf_files.TYPES)")
    ap.add_argument("--out", default=str(OUT / "t5_formats.json"))
    ap.add_argument("--worker", nargs=3, metavar=("PATH", "DTYPE", "TOKENS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]))))
        return
    fp16 = OUT / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    if not fp16.exists():
        models.write_t5_file(fp16, "full", layers=a.layers)
    f16 = _run("fp16 safetensors", fp16, a.dtype, a.tokens)
    dtype_bytes = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    gib, rows, ratios = 2**30, [f16], []
    f16["full_gib"] = f16["full_file_gb"] = float("nan")  # the extrapolation is the GGUF layout's
    for file_type in a.types:
        path = OUT / f"t5xxl_random_{a.layers}l-{file_type}.gguf"
        if not path.exists():
            t = time.perf_counter()
            write_gguf_from(fp16, path, file_type)
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
        r = _run(f"GGUF {file_type}", path, a.dtype, a.tokens)
        few = layout_bytes(models.t5_config("full", a.layers), file_type, FULL_LAYERS, dtype_bytes)
        full = layout_bytes(models.t5_config("full"), file_type, FULL_LAYERS, dtype_bytes)
        if few[1] != r["model_bytes"]:
            raise SystemExit(f"{file_type}: measured {r['model_bytes']} bytes in memory, the layout says {few[1]}: "
                             "the 24-block extrapolation would be wrong")
        r.update(full_file_gb=full[0] / 1e9, full_gib=full[1] / gib)
        rows.append(r)
        ratios.append({"kind": f"{file_type} / fp16", **{k: r[k] / f16[k] for k in
                       ("file_gib", "seconds", "model_gib", "anon_gib", "rss_gib", "encode_s", "full_gib")},
                       "full_file_gb": float("nan")})
    print_table(f"T5-XXL width, {a.layers} blocks, compute {a.dtype}, encode of {a.tokens} tokens "
                f"(24 blocks: file tensors in GB from the layout, model in memory in GiB extrapolated)",
                [("file", 18, "{kind}"), ("file GiB", 9, "{file_gib:.2f}"), ("load s", 8, "{seconds:.2f}"),
                 ("model GiB", 10, "{model_gib:.3f}"), ("peak anon GiB", 14, "{anon_gib:.2f}"),
                 ("peak RSS GiB", 13, "{rss_gib:.2f}"), ("encode s", 9, "{encode_s:.3f}"),
                 ("24: file GB", 12, "{full_file_gb:.3f}"), ("24: model GiB", 14, "{full_gib:.3f}")],
                [*rows, *ratios])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"layers": a.layers, "dtype": a.dtype, "rows": rows, "ratios": ratios},
                                      indent=2))


if __name__ == "__main__":
    main()

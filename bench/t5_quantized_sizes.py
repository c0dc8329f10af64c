"""The size of a quantized T5-v1.1-XXL per compute dtype, measured on full-width blocks and extrapolated to 24.

A full fp32 T5-XXL (18 GB) does not fit a shared machine, so the file holds the real width (d_model 4096, d_ff
10240, 64 heads, 32128 tokens) with only `--layers` blocks (default 2, random weights, fp16; harness.models). Each
mode is loaded in a fresh process through pixart_core.t5.load_t5 and its tensors are counted as the ModelPatcher
counts them (pixart_core.quant.unique_bytes: parameters, buffers, bitsandbytes' scales and 4-bit state, each
storage once) per part: the embedding and final norm, block 0 (which also holds the relative attention bias) and
block 1. All blocks after the first have block 1's layout, so 24 blocks = the rest + block 0 + 23 x block 1.

Rows: unquantized bf16/fp32 (for reference), 8-bit and nf4 computing in bf16 and in fp32 as transformers loads them
(its bitsandbytes loader keeps every `wo` in the compute dtype), and in fp32 with the layers bitsandbytes leaves
unquantized stored in bf16 (pixart_core.t5.store_unquantized, what the T5 Loader does on a GPU). `cos` compares
each row's last hidden state for 32 random tokens with the unquantized fp32 one.

    ./scripts/harness bench.t5_quantized_sizes [--layers 2]
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

from .report import machine, print_table
from .weights import OUT

ROWS = [  # (label, mode, compute dtype, unquantized layers stored in bf16)
    ("none bf16", "none", "bfloat16", False), ("none fp32", "none", "float32", False),
    ("8bit bf16", "8bit", "bfloat16", False), ("8bit fp32", "8bit", "float32", False),
    ("8bit fp32, unquantized in bf16", "8bit", "float32", True),
    ("nf4 bf16", "nf4", "bfloat16", False), ("nf4 fp32", "nf4", "float32", False),
    ("nf4 fp32, unquantized in bf16", "nf4", "float32", True),
]
BLOCKS = 24  # T5-v1.1-XXL's encoder


def worker(path: str, mode: str, dtype: str, narrow: str, reference: str) -> dict:
    """Load one row in this (fresh) process; its sizes per part and its hidden state against the reference."""
    import torch

    from pixart_core import t5 as ct5
    from pixart_core.quant import unique_bytes

    t = time.perf_counter()
    loaded = ct5.load_t5(path, mode, getattr(torch, dtype), unquantized_dtype=torch.bfloat16 if narrow == "1" else None)
    seconds = time.perf_counter() - t
    model = loaded.model
    blocks = [unique_bytes(b) for b in model.encoder.block]
    rest = unique_bytes(model) - sum(blocks)
    ids = torch.randint(2, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state.float()
    ref = Path(reference)
    if not ref.exists():
        torch.save(hidden, ref)
    cos = torch.nn.functional.cosine_similarity(hidden.flatten(), torch.load(ref).flatten(), dim=0).item()
    return {"load_s": seconds, "rest": rest, "block0": blocks[0], "block1": blocks[1],
            "full": rest + blocks[0] + (BLOCKS - 1) * blocks[1], "cos": cos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(OUT / "t5_quantized_sizes.json"))
    ap.add_argument("--worker", nargs=5, metavar=("PATH", "MODE", "DTYPE", "NARROW", "REF"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    if a.layers < 2:
        raise SystemExit("--layers must be at least 2 (block 0 holds the relative attention bias, block 1 does not)")
    path = OUT / f"t5xxl_random_{a.layers}l_fp16.safetensors"
    if not path.exists():
        models.write_t5_file(path, "full", layers=a.layers)
    reference = OUT / f"t5_quantized_sizes_reference_{a.layers}l.pt"
    reference.unlink(missing_ok=True)
    rows = []
    for label, mode, dtype, narrow in sorted(ROWS, key=lambda r: r[0] != "none fp32"):  # the reference first
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--worker", str(path), mode, dtype,
                              "1" if narrow else "0", str(reference)], capture_output=True, text=True, env=child_env())
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(f"{label}: load failed")
        rows.append({"label": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    rows.sort(key=lambda r: [x[0] for x in ROWS].index(r["label"]))
    gib, mib = 2**30, 2**20
    table = [{**r, "full_gib": r["full"] / gib, "rest_mib": r["rest"] / mib, "block_mib": r["block1"] / mib}
             for r in rows]
    print_table(f"T5-XXL sizes from {a.layers} full-width blocks ({path.name}), extrapolated to {BLOCKS} blocks",
                [("row", 32, "{label}"), ("24 blocks GiB", 15, "{full_gib:.2f}"), ("per block MiB", 15, "{block_mib:.1f}"),
                 ("embedding+norm MiB", 20, "{rest_mib:.1f}"), ("cos vs fp32", 13, "{cos:.5f}")], table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine(), "file": str(path), "layers": a.layers, "rows": rows},
                                      indent=2))


if __name__ == "__main__":
    main()

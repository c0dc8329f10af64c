"""Memory of each stage of 1024 -> 2K -> 4K on the CPU: one CFG-batched DiT forward (batch 1) at 1024x1024 (the Σ-1024
first pass), at 2048x2048 (the hires img2img with the 2K model), and one forward of the tiled refine at 3840x2160
(pixart_core.tiles.TiledDiT: four 2688x1536 tiles of the 2K bins, overlap 256 px), against the untiled forward at
3840x2160 that the tiles avoid.

Each stage runs in a fresh process; the figure is the peak resident memory during the forward (VmHWM, reset after
the model is built) minus the memory before it: the activations. Weights are added from the parameter count.

    ./scripts/harness bench.hires_memory                 # tiny and full-width models
    ./scripts/harness bench.hires_memory --sizes tiny

Sizes: "tiny" is the tests' 2-block DiT. "full" is the real PixArt XL/2 width (16 heads x 72, MLP 4x, caption 4096)
with ONE of its 28 blocks: activations live one block at a time (each block's are freed before the next), so the
peak of a 1-block forward is the peak of the 28-block one, at 1/28 of the time; a whole 28-block forward at 2K
(~96 TFLOP with CFG) takes several minutes on this 2-core CPU. The untiled 3840x2160 forward is run for the tiny model
only (full width: over 10 minutes per forward on this CPU; the table says "not run").
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness.location import child_env

from .measure import peak_rss_bytes, reset_peak_rss, rss_bytes
from .weights import OUT

MiB = 1 << 20
STAGES = {  # key: (canvas width, height, tile width, height or None)
    "1024": (1024, 1024, None, None),
    "2k": (2048, 2048, None, None),
    "4k-tiled": (3840, 2160, 2688, 1536),
    "4k-untiled": (3840, 2160, None, None),
}
LABELS = {"1024": "1024x1024 (Σ-1024 first pass)", "2k": "2048x2048 (hires img2img, Σ-2K)",
          "4k-tiled": "3840x2160 tiled refine, one step (Σ-2K, 2688x1536 tiles)",
          "4k-untiled": "3840x2160 untiled (what tiles avoid)"}
OVERLAP = 256


def _model(size: str):
    import torch

    from harness import models

    layers = 1 if size == "full" else None
    dit = models.make_dit("bench" if size == "full" else "tiny", variant="sigma-2k", layers=layers)
    return dit.to(torch.float32), models.SIZES["bench" if size == "full" else "tiny"]


def worker(size: str, stage: str) -> dict:
    """One forward of `stage` in this fresh process; its activation peak and time."""
    import torch

    from pixart_core import tiles

    torch.manual_seed(0)
    dit, s = _model(size)
    w, h, tw, th = STAGES[stage]
    x = torch.randn(2, 4, h // 8, w // 8)
    text = torch.randn(2, 20, s.t5_width)
    model, n_tiles = dit, 1
    if tw is not None:
        layout = tiles.layout(h // 8, w // 8, th // 8, tw // 8, OVERLAP // 8)
        model, n_tiles = tiles.TiledDiT(dit, layout, (h // 8, w // 8)), len(layout)
        if size == "full":  # one tile's forward (the rest repeat it): the DiT on one tile-sized crop
            model, x = dit, x[..., :th // 8, :tw // 8]
    kwargs = dict(encoder_hidden_states=text, timestep=torch.tensor([500, 500]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        before = rss_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        out = model(x, **kwargs)[0]
        seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() - before
    blocks = 28 if size == "full" else len(dit.transformer_blocks)
    per_block = sum(p.numel() for p in dit.transformer_blocks[0].parameters())
    rest = sum(p.numel() for p in dit.parameters()) - per_block * len(dit.transformer_blocks)
    return {"size": size, "stage": stage, "canvas": [w, h], "tile": [tw, th] if tw else None, "tiles": n_tiles,
            "tokens_per_forward": (min(h, th or h) // 16) * (min(w, tw or w) // 16),
            "activation_peak_mib": round(peak / MiB, 1), "forward_s": round(seconds, 2),
            "timed_forwards": 1 if size == "full" else n_tiles,
            "weights_fp32_mib": round((rest + per_block * blocks) * 4 / MiB, 1), "out": list(out.shape)}


def not_run(size: str, stage: str) -> dict:
    w, h, _, _ = STAGES[stage]
    return {"size": size, "stage": stage, "canvas": [w, h], "tile": None, "tiles": 1,
            "tokens_per_forward": (h // 16) * (w // 16), "not_run": "full width: over 10 min per forward here"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,full")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stage names")
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "STAGE"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=OUT / "hires_memory.json")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    rows = []
    for size in a.sizes.split(","):
        for stage in a.stages.split(","):
            if size == "full" and stage == "4k-untiled":
                rows.append(not_run(size, stage))
                continue
            print(f"[hires_memory] {size}: {LABELS[stage]} ...", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, "-m", "bench.hires_memory", "--worker", size, stage],
                               capture_output=True, text=True, env=child_env(), timeout=3600)
            if r.returncode:
                rows.append({"size": size, "stage": stage, "error": r.stderr[-2000:]})
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": "see bench/RESULTS.md", "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print("| model | stage | tokens / forward | forwards / step | activation peak MiB | s / forward | DiT weights fp32 MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = r["not_run"] if "not_run" in r else r.get("activation_peak_mib", "error")
        seconds = r.get("forward_s", "-")
        if r.get("timed_forwards", 1) > 1:
            seconds = f"{seconds} ({r['timed_forwards']} tiles)"
        print(f"| {r['size']} | {LABELS[r['stage']]} | {r.get('tokens_per_forward', '-')} | {r.get('tiles', '-')} | "
              f"{peak} | {seconds} | {r.get('weights_fp32_mib', '-')} |")
        if "error" in r:
            print(r["error"], file=sys.stderr)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""Our VAE decode (the PixArt-Σ VAE Loader `auto` + VAE Decode nodes) against diffusers-bf16's (AutoencoderKL
from_pretrained(torch_dtype=bfloat16), as bench.p1_text_to_image sets it up), interleaved in one process on the
bench's random full-size SDXL VAE at 256 px (latent 1x4x32x32): paired wall ratios, CPU, kernel time and minor page
faults per decode, and the torch.profiler op shares of each. How many of a decode's pages are new depends on glibc
malloc's state (MALLOC_MMAP_THRESHOLD_=131072 in the environment: every large allocation newly mapped, ~425k faults
per decode; the default: 30k-200k, varying with what the process freed before).

    ./scripts/harness bench.vae_decode_ab [--pairs 6]

Op shares and paired ratios hold under load; absolute seconds do not.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from harness import models
from harness.comfyui import init_comfy, pack

from .measure import emit, kernel_usage, log
from .weights import SEEDS, VAE_FILE

def timed(fn) -> dict:
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    sys_s, faults = kernel_usage(r0, r1)
    return {"wall": wall, "cpu": r1.ru_utime - r0.ru_utime + sys_s, "sys": sys_s, "faults": faults}


def op_shares(fn, top: int = 6) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    ka = p.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    return {e.key: (e.count, round(e.self_cpu_time_total / total, 3)) for e in
            sorted(ka, key=lambda e: -e.self_cpu_time_total)[:top]}


def paired(a: list[dict], b: list[dict], key: str) -> dict:
    r = [x[key] / y[key] for x, y in zip(a, b) if y[key]]
    return {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    a = ap.parse_args()
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="vae_ab_"))
    vae = models.make_vae("bench", SEEDS["vae"])
    (tmp / "models" / "vae").mkdir(parents=True)
    save_file(models.vae_to_ldm(vae.state_dict()), str(tmp / "models" / "vae" / VAE_FILE))  # fp32, LDM keys
    vae.save_pretrained(tmp / "diffusers_vae", safe_serialization=True)
    del vae
    init_comfy(tmp, quiet=True)
    nodes = pack("nodes.vae")
    handle = nodes.VAELoader.execute(VAE_FILE, "auto").result[0]
    theirs = AutoencoderKL.from_pretrained(str(tmp / "diffusers_vae"), torch_dtype=torch.bfloat16)
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def ours():
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return nodes.VAEDecode.execute(handle, {"samples": latent}).result[0]

    def diffusers():
        with torch.no_grad():  # as the pipeline's __call__
            return theirs.decode(latent.to(torch.bfloat16), return_dict=False)[0]

    log(f"ours: {handle.patcher.model.inner.dtype}, diffusers: {theirs.dtype}; threads {torch.get_num_threads()}")
    ours(), diffusers()
    runs = {"ours": [], "diffusers": []}
    for _ in range(a.pairs):
        runs["ours"].append(timed(ours))
        runs["diffusers"].append(timed(diffusers))
    emit({"ours_over_diffusers": {k: paired(runs["ours"], runs["diffusers"], k) for k in ("wall", "cpu")},
          "runs": runs,
          "op_shares": {"ours": op_shares(ours), "diffusers": op_shares(diffusers)}})


if __name__ == "__main__":
    main()

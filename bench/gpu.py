"""P4: PixArt-Σ 1024 px on an NVIDIA GPU: seconds per image, model FLOP utilisation and peak VRAM of our nodes
(inside ComfyUI's model management) next to diffusers' PixArtSigmaPipeline, in the same run, on the same weights.

Weights (written once to bench/out/gpu_p4/models/, random, full size): the PixArt-Σ XL/2 1024-MS transformer
(0.61B parameters, diffusers keys), the SDXL VAE, and a T5 with the real width 4096 but 2 blocks (the text side is
encoded once before timing and is not part of the per-image time).

Every configuration (dtype bf16 / fp16, torch.compile off / on) runs each system in a fresh process (its own CUDA
peak), the two systems in alternating order. A process loads the DiT and VAE, encodes the prompt, counts the DiT's
FLOPs, makes one warm-up image (this is where torch.compile compiles), then times --images images at 1024x1024,
20 steps, CFG 4.5, DPM-Solver++ 2M, batch 1: sampler and VAE-decode seconds each behind a CUDA synchronize.

  MFU = DiT model FLOPs per image / sampler seconds / the GPU's dense peak for the dtype. Model FLOPs are counted by
  torch's FlopCounterMode over one CFG-batched forward of our sampler (real caption tokens), times the steps; the
  same count is used for diffusers, which also computes on 300 padded caption tokens (its own count is printed too).

    bash bench/gpu.sh                                # bf16, fp16, bf16 + torch.compile (sized for < 5 min on an H100; not yet run)
    bash bench/gpu.sh --configs bf16-compile,fp16-compile --images 5
    ./scripts/harness bench.gpu --cpu-smoke        # check the script on the CPU with tiny models (no GPU numbers)

Writes bench/out/gpu_p4.json and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from bench import measure, report, weights
from harness import models
from harness.comfyui import init_comfy, make_base
from harness.location import comfyui_path

OUT = weights.OUT / "gpu_p4"
SMOKE_OUT = weights.OUT / "gpu_p4_smoke"
DIT = "PixArt-Sigma-XL-2-1024-MS.safetensors"
T5 = "t5-w4096-l2_fp16.safetensors"
VAE = "sdxl_vae.safetensors"
SEED, CFG = 0, 4.5
CONFIGS = ("bf16", "fp16", "bf16-compile", "fp16-compile")

# Dense (no sparsity) tensor-core peaks in TFLOP/s, bf16 = fp16, from NVIDIA's data sheets; --peak-tflops overrides.
PEAKS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
         ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
         ("A10", 125.0)]

VARIANT = "sigma-1024"  # the 1024-MS family


def prepare(base: Path, smoke: bool) -> None:
    """The weight files (once); dit_config.json beside the DiT tells the diffusers worker its architecture."""
    models_dir = base / "models"
    marker = models_dir / "complete.json"
    if marker.is_file():
        return
    from safetensors.torch import save_file

    for d in ("diffusion_models", "text_encoders", "vae"):
        (models_dir / d).mkdir(parents=True, exist_ok=True)
    size = "tiny" if smoke else "bench"
    dit = models.make_dit(size, variant=VARIANT)
    config = models.dit_config(size, VARIANT)
    t5, vae = models.make_t5(size, seed=1, layers=2), models.make_vae(size, seed=2)
    save_file({k: v.half().contiguous() for k, v in dit.state_dict().items()}, str(models_dir / "diffusion_models" / DIT))
    (models_dir / "diffusion_models" / "dit_config.json").write_text(json.dumps(config))
    save_file(models.t5_single_file_sd(t5), str(models_dir / "text_encoders" / T5))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models_dir / "vae" / VAE))
    marker.write_text("{}")
    make_base(base)


# ---------------------------------------------------------------------------------------------------- workers


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_allocated": 0, "peak_reserved": 0}
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _timed(device, sample, decode) -> tuple[float, float, object]:
    """(sampler seconds, decode seconds, image), each part behind a device synchronize."""
    _sync(device)
    t0 = time.perf_counter()
    latent = sample()
    _sync(device)
    t1 = time.perf_counter()
    img = decode(latent)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1, img


def _time_images(a, device, make) -> dict:
    """One warm-up image, then a.images timed ones; make(seed) returns (sampler seconds, decode seconds, image)."""
    import torch

    t = time.perf_counter()
    _, _, img = make(SEED)
    warmup = time.perf_counter() - t
    _reset_peak(device)
    sampler, decode = [], []
    for i in range(a.images):
        s, d, img = make(SEED + 1 + i)
        sampler.append(s)
        decode.append(d)
    if not bool(torch.isfinite(img).all()) or float(img.float().std()) < 1e-3:
        raise RuntimeError(f"degenerate image: finite={bool(torch.isfinite(img).all())} std={float(img.float().std())}")
    return {"warmup_s": warmup, "sampler_s": sampler, "decode_s": decode, "image": list(img.shape), **_peak(device)}


def worker_ours(a) -> dict:
    base = Path(a.base)
    init_comfy(base, cpu=a.smoke)
    import torch
    import comfy.model_management as mm
    import nodes

    N = nodes.NODE_CLASS_MAPPINGS
    device = mm.get_torch_device()
    with torch.inference_mode():
        t5 = N["PixArtSigmaT5Loader"].execute(t5_name=T5, quantization="none", dtype="auto").result[0]
        pos, neg = N["PixArtSigmaTextEncode"].execute(t5=t5, positive=weights.PROMPT, negative="",
                                                      max_tokens=300).result
    del t5
    mm.unload_all_models()
    mm.soft_empty_cache()
    dit = N["PixArtSigmaDiTLoader"].execute(dit_name=DIT, variant="auto", dtype=a.dtype).result[0]
    vae = N["PixArtSigmaVAELoader"].execute(vae_name=VAE, dtype="bf16").result[0]

    def sample(seed, steps):
        return N["PixArtSigmaSampler"].execute(dit=dit, positive=pos, negative=neg, seed=seed, steps=steps, cfg=CFG,
                                               scheduler="dpm++ 2m", width=a.size, height=a.size,
                                               batch_size=1).result[0]

    with torch.inference_mode():
        sample(SEED, 1)  # loads the DiT onto the device before counting
        flops = _flops(lambda: sample(SEED, 1))  # one step = one CFG-batched forward (+ the scheduler's few ops)
    if a.compile:
        dit.patcher.model.inner.compile()  # in place: same module, keys and ModelPatcher

    def make(seed):
        with torch.inference_mode():
            return _timed(device, lambda: sample(seed, a.steps),
                          lambda latent: N["PixArtSigmaVAEDecode"].execute(vae=vae, samples=latent).result[0])

    caption_tokens = int(pos.mask.sum())
    return {"flops_per_forward": flops, "caption_tokens": caption_tokens, **_time_images(a, device, make)}


def worker_diffusers(a) -> dict:
    import torch
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pixart_core import schedulers
    from pixart_core import t5 as ct5

    models_dir = Path(a.base) / "models"
    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    tokenizer = AutoTokenizer.from_pretrained(str(comfyui_path() / "comfy" / "text_encoders" / "t5_tokenizer"))
    text_encoder = ct5.load_t5(models_dir / "text_encoders" / T5, "none", torch.float32).model.to(device)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=None, vae=None,
                               scheduler=schedulers.make("dpmpp_2m"))
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(weights.PROMPT, negative_prompt="", device=device, clean_caption=False)
    del pipe, text_encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    config = json.loads((models_dir / "diffusion_models" / "dit_config.json").read_text())
    dit = PixArtTransformer2DModel(**config)
    dit.load_state_dict(load_file(str(models_dir / "diffusion_models" / DIT)))
    dit = dit.to(device, dtype).eval()
    vae = AutoencoderKL(**models.vae_config("tiny" if a.smoke else "bench"))
    vae.load_state_dict(load_file(str(models_dir / "vae" / VAE)))
    vae = vae.to(device, torch.bfloat16).eval()
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=None, transformer=dit, vae=vae,
                               scheduler=schedulers.make("dpmpp_2m"))
    pipe.set_progress_bar_config(disable=True)
    embeds = dict(prompt_embeds=pe.to(dtype), prompt_attention_mask=pm, negative_prompt_embeds=ne.to(dtype),
                  negative_prompt_attention_mask=nm)

    def sample(seed, steps):
        return pipe(prompt=None, negative_prompt=None, **embeds, num_inference_steps=steps, guidance_scale=CFG,
                    height=a.size, width=a.size, generator=torch.Generator("cpu").manual_seed(seed),
                    use_resolution_binning=False, output_type="latent").images

    with torch.no_grad():
        flops = _flops(lambda: sample(SEED, 1))
    if a.compile:
        dit.compile()

    def decode(latents):
        img = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(img, output_type="pt").permute(0, 2, 3, 1).float().cpu()

    def make(seed):
        with torch.no_grad():
            return _timed(device, lambda: sample(seed, a.steps), decode)

    return {"flops_per_forward": flops, "caption_tokens": int(pm.shape[1]), **_time_images(a, device, make)}


# ---------------------------------------------------------------------------------------------------- parent


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in PEAKS if key.lower() in name.lower()), None)


def run_config(a, system: str, config: str) -> dict:
    dtype, _, comp = config.partition("-")
    args = ["--worker", system, "--base", str(a.base), "--dtype", dtype, "--size",
            str(a.size), "--steps", str(a.steps), "--images", str(a.images)]
    args += ["--compile"] if comp == "compile" else []
    args += ["--cpu-smoke"] if a.cpu_smoke else []
    out, stderr, seconds = measure.worker_result(__spec__.name, args, a.timeout)
    if out is None:
        measure.log(f"{system} {config}: failed\n{stderr[-4000:]}")
        return {"system": system, "config": config, "error": stderr[-2000:]}
    out.update(system=system, config=config, process_s=seconds)
    return out


def summarize(rows: list[dict], peak: float | None, steps: int) -> tuple[str, dict]:
    """The markdown table and the median seconds per image by config/system. MFU uses our model FLOPs (real
    caption tokens) for both systems of a configuration."""
    ok = [r for r in rows if "error" not in r]
    totals = {(r["config"], r["system"]): statistics.median([x + y for x, y in zip(r["sampler_s"], r["decode_s"])])
              for r in ok}
    ours_flops = {r["config"]: r["flops_per_forward"] for r in ok if r["system"] == "ours"}
    lines = ["| config | system | s/image | sampler s | decode s | warm-up s | DiT TFLOP/s | MFU | executed TFLOP/forward "
             "| peak VRAM GiB | ours / diffusers |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['system']} | failed | | | | | | | | |")
            continue
        s = statistics.median(r["sampler_s"])
        tflops = ours_flops.get(r["config"], r["flops_per_forward"]) * steps / s / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        other = totals.get((r["config"], "diffusers"))
        ratio = f"{totals[(r['config'], 'ours')] / other:.2f}" if r["system"] == "ours" and other else ""
        lines.append(f"| {r['config']} | {r['system']} | {totals[(r['config'], r['system'])]:.2f} | {s:.2f} "
                     f"| {statistics.median(r['decode_s']):.2f} | {r['warmup_s']:.1f} | {tflops:.1f} | {mfu} "
                     f"| {r['flops_per_forward'] / 1e12:.2f} | {r['peak_allocated'] / 2**30:.2f} | {ratio} |")
    return "\n".join(lines), {f"{c}/{s}": v for (c, s), v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="bf16,fp16,bf16-compile", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=3, help="timed images per system and configuration")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16/fp16 peak, if not in the built-in table")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    ap.add_argument("--cpu-smoke", action="store_true", help="check this script on the CPU with tiny models "
                    "(64 px, 2 steps, 1 image; no GPU numbers)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.smoke = a.cpu_smoke
    if a.worker:
        import torch

        torch.manual_seed(0)
        measure.emit((worker_ours if a.worker == "ours" else worker_diffusers)(a))
        return

    import torch

    if a.cpu_smoke:
        a.size, a.steps, a.images = 64, 2, 1
        a.base = SMOKE_OUT
        device_name = "CPU smoke test (tiny models: the numbers mean nothing)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False); "
                             "--cpu-smoke checks the script on the CPU.")
        a.base = OUT
        device_name = torch.cuda.get_device_name()
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    t = time.perf_counter()
    prepare(Path(a.base), a.cpu_smoke)
    measure.log(f"weights ready in {time.perf_counter() - t:.0f} s ({a.base})")
    peak = None if a.cpu_smoke else peak_tflops(device_name, a.peak_tflops)
    rows = []
    for i, config in enumerate(configs):
        for system in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
            measure.log(f"{config}: {system} ...")
            rows.append(run_config(a, system, config))
    table, medians = summarize(rows, peak, a.steps)
    versions = {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers")}
    head = (f"{device_name}; {a.size}x{a.size}, {a.steps} steps, CFG {CFG}, batch 1; median of {a.images} images "
            f"after one warm-up; VAE bf16; peak {peak or 'unknown'} TFLOP/s; "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(head)
    print(table)
    out = a.out or (weights.OUT / ("gpu_p4_smoke.json" if a.cpu_smoke else "gpu_p4.json"))
    report.write_json(out, {"device": device_name, "peak_tflops": peak, "size": a.size, "steps": a.steps,
                            "images": a.images, "versions": versions, "machine": report.machine(), "rows": rows,
                            "median_s_per_image": medians, "table": table})
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} worker(s) failed")


if __name__ == "__main__":
    main()

"""Peak VRAM of a whole PixArt-Σ 1024 px image under ComfyUI's model management, next to diffusers' 8-bit recipe.

Needs an NVIDIA GPU. Full-size random weights (harness.models preset "full": T5-v1.1-XXL 4.76B, DiT XL/2 0.6B,
SDXL VAE) are written once to bench/out/gpu_models/. Each mode runs in a fresh process so the CUDA peak is its own:
  ours-none / ours-8bit / ours-nf4: our nodes (T5 loader -> encode -> DiT -> sampler -> VAE decode) inside ComfyUI
    (models loaded and evicted by comfy.model_management), 1024x1024, 20 steps, bf16.
  diffusers-8bit: the diffusers documentation's low-memory recipe (8-bit T5 encodes, is deleted, then the
    transformer samples and is deleted, then the VAE decodes).

    bash bench/gpu_memory.sh        # or: ./scripts/harness bench.gpu_memory --modes ours-8bit,diffusers-8bit
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import models
from harness.location import child_env, comfyui_path

from .report import print_table
from .weights import OUT

MODELS = OUT / "gpu_models"
PROMPT = "a small cactus with a happy face in the sahara desert"
VARIANT = "sigma-1024"
T5_FILE = "text_encoders/t5xxl_fp16.safetensors"
DIT_FILE = "checkpoints/PixArt-Sigma-XL-2-1024-MS.safetensors"
VAE_FILE = "vae/sdxl_vae.safetensors"
QUANTS = {"none": "none", "8bit": "8-bit (bitsandbytes)", "nf4": "4-bit nf4 (bitsandbytes)"}


def prepare(models_dir: Path) -> None:
    """Random full-size weights in the files users have (the T5 streamed to disk; small init keeps activations
    finite)."""
    from safetensors.torch import save_file

    if not (models_dir / T5_FILE).exists():
        models.write_t5_file(models_dir / T5_FILE, "full")
    if not (models_dir / DIT_FILE).exists():
        dit = models.make_dit("full", variant=VARIANT)
        (models_dir / DIT_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in dit.state_dict().items()}, str(models_dir / DIT_FILE))
    if not (models_dir / VAE_FILE).exists():
        vae = models.make_vae("full")
        (models_dir / VAE_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(models_dir / VAE_FILE))


def _no_cuda_statistics() -> None:
    """CPU smoke test of this script with tiny models: the CUDA statistics read 0."""
    import torch

    for name in ("reset_peak_memory_stats", "synchronize"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)


def _result(t0: float, after_t5: int, img) -> dict:
    import torch

    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(), "peak_during_t5": after_t5, "image": list(img.shape),
            "finite": bool(torch.isfinite(img).all())}


def worker_ours(a) -> dict:
    """Our nodes inside ComfyUI, models placed and evicted by its model management."""
    import tempfile

    import torch

    from harness.comfyui import init_comfy, make_base

    base = make_base(Path(tempfile.mkdtemp()))
    (base / "models").symlink_to(Path(a.models).absolute(), target_is_directory=True)
    if a.smoke:
        _no_cuda_statistics()
    nodes = init_comfy(base, cpu=a.smoke)
    N = nodes.NODE_CLASS_MAPPINGS
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.inference_mode():
        t5 = N["PixArtSigmaT5Loader"].execute(t5_name=Path(T5_FILE).name, quantization=QUANTS[a.quant],
                                              dtype="bf16").result[0]
        pos, neg = N["PixArtSigmaTextEncode"].execute(t5=t5, positive=PROMPT, negative="", max_tokens=300).result
        after_t5 = torch.cuda.max_memory_allocated()
        dit = N["PixArtSigmaDiTLoader"].execute(dit_name=Path(DIT_FILE).name, variant="auto", dtype="bf16").result[0]
        lat = N["PixArtSigmaSampler"].execute(dit=dit, positive=pos, negative=neg, seed=0, steps=a.steps, cfg=4.5,
                                              scheduler="dpm++ 2m", width=a.size, height=a.size, batch_size=1).result[0]
        vae = N["PixArtSigmaVAELoader"].execute(vae_name=Path(VAE_FILE).name, dtype="bf16").result[0]
        img = N["PixArtSigmaVAEDecode"].execute(vae=vae, samples=lat).result[0]
    return _result(t, after_t5, img)


def worker_diffusers(a) -> dict:
    """diffusers' low-memory recipe: 8-bit T5 encodes and is deleted, the transformer samples, the VAE decodes."""
    import gc
    import os
    import tempfile

    import torch
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BitsAndBytesConfig, T5EncoderModel

    from pixart_core import files, schedulers, t5_spec

    models_dir = Path(a.models)
    tmp = Path(tempfile.mkdtemp())
    cfg = t5_spec.config_from_shapes(files.read_shapes(models_dir / T5_FILE), "t5")
    cfg.save_pretrained(tmp)
    os.symlink(models_dir / T5_FILE, tmp / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(str(comfyui_path() / "comfy" / "text_encoders" / "t5_tokenizer"))
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    text_encoder = T5EncoderModel.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                  device_map="auto")
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder, transformer=None, vae=None,
                               scheduler=schedulers.make("dpmpp_2m"))
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(PROMPT, negative_prompt="", device="cuda")
    after_t5 = torch.cuda.max_memory_allocated()
    del text_encoder, pipe
    gc.collect()
    torch.cuda.empty_cache()
    dit = PixArtTransformer2DModel(**models.dit_config("full", VARIANT))
    dit.load_state_dict(load_file(models_dir / DIT_FILE))
    dit = dit.to("cuda", torch.bfloat16)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, transformer=dit, vae=None,
                               scheduler=schedulers.make("dpmpp_2m"))
    latents = pipe(negative_prompt=None, prompt_embeds=pe.to(torch.bfloat16), prompt_attention_mask=pm,
                   negative_prompt_embeds=ne.to(torch.bfloat16), negative_prompt_attention_mask=nm,
                   num_inference_steps=a.steps, guidance_scale=4.5, height=a.size, width=a.size,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
                   use_resolution_binning=False).images
    del pipe, dit
    gc.collect()
    torch.cuda.empty_cache()
    vae = AutoencoderKL(**models.vae_config("full"))
    vae.load_state_dict(load_file(models_dir / VAE_FILE))
    vae = vae.to("cuda", torch.bfloat16)
    with torch.no_grad():
        img = vae.decode(latents.to(torch.bfloat16) / vae.config.scaling_factor).sample
    return _result(t, after_t5, img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="ours-none,ours-8bit,ours-nf4,diffusers-8bit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=str(OUT / "gpu_memory.json"))
    ap.add_argument("--cpu-smoke", metavar="MODELS_DIR", help="check this script on the CPU with tiny models laid out "
                    "like bench/out/gpu_models (text_encoders/t5xxl_fp16.safetensors, ...); ours-* modes only")
    ap.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--quant", choices=list(QUANTS), help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.smoke = bool(a.cpu_smoke)
    if a.worker:
        print(json.dumps((worker_ours if a.worker == "ours" else worker_diffusers)(a)))
        return
    import torch

    models_dir = Path(a.cpu_smoke) if a.cpu_smoke else MODELS
    if not a.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_memory.py needs an NVIDIA GPU (torch.cuda.is_available() is False).")
    t = time.perf_counter()
    if not a.cpu_smoke:
        prepare(models_dir)
    print(f"weights ready in {time.perf_counter() - t:.0f} s ({models_dir})")
    rows = []
    for mode in a.modes.split(","):
        system, _, quant = mode.partition("-")
        args = [sys.executable, "-m", __spec__.name, "--worker", system, "--models", str(models_dir),
                "--steps", str(a.steps), "--size", str(a.size)]
        args += ["--quant", quant] if system == "ours" else []
        args += ["--cpu-smoke", str(models_dir)] if a.cpu_smoke else []
        r = subprocess.run(args, capture_output=True, text=True, env=child_env())
        if r.returncode:
            print(f"{mode}: failed\n{r.stderr[-3000:]}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row.update(mode=mode, **{k + "_gib": row[k] / 2**30 for k in ("peak_allocated", "peak_reserved",
                                                                       "peak_during_t5")})
        rows.append(row)
    device = "CPU smoke test" if a.cpu_smoke else torch.cuda.get_device_name()
    print_table(f"{device}, {a.size}px, {a.steps} steps, torch {torch.__version__}",
                [("mode", 16, "{mode}"), ("seconds", 9, "{seconds:.1f}"), ("peak alloc GiB", 16, "{peak_allocated_gib:.2f}"),
                 ("peak reserved GiB", 19, "{peak_reserved_gib:.2f}"), ("peak in T5 GiB", 16, "{peak_during_t5_gib:.2f}")],
                rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Peak VRAM of a whole PixArt-Σ 1024 px image under ComfyUI's model management, next to diffusers' 8-bit recipe.

Needs an NVIDIA GPU. Full-size random weights (T5-v1.1-XXL 4.76B, DiT XL/2 0.6B, SDXL VAE) are written once to
bench/out/gpu_models/. Each mode runs in a fresh process so the CUDA peak is its own:
  ours-none / ours-8bit / ours-nf4: our nodes (T5 loader -> encode -> DiT -> sampler -> VAE decode) inside ComfyUI
    (models loaded and evicted by comfy.model_management), 1024x1024, 20 steps, bf16.
  diffusers-8bit: the diffusers documentation's low-memory recipe (8-bit T5 encodes, is deleted, then the
    transformer samples and is deleted, then the VAE decodes).

    bash bench/gpu_memory.sh        # or: .venv/bin/python bench/gpu_memory.py --modes ours-8bit,diffusers-8bit
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MODELS = OUT / "gpu_models"
COMFY = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".cache" / "comfyui-0.3.75")
PROMPT = "a small cactus with a happy face in the sahara desert"


def prepare() -> None:
    """Random full-size weights in the files users have (streamed; small init keeps activations finite)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "bench"))
    from t5_quantize_memory import write_random_t5

    for d in ("text_encoders", "checkpoints", "vae"):
        (MODELS / d).mkdir(parents=True, exist_ok=True)
    t5 = MODELS / "text_encoders" / "t5xxl_fp16.safetensors"
    if not t5.exists():
        write_random_t5(t5, 24)
    dit = MODELS / "checkpoints" / "PixArt-Sigma-XL-2-1024-MS.safetensors"
    if not dit.exists():
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        m = PixArtTransformer2DModel(sample_size=128, interpolation_scale=2.0, use_additional_conditions=False,
                                     caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                     norm_eps=1e-6, num_embeds_ada_norm=1000)
        save_file({k: (v * 0.2).half().contiguous() for k, v in m.state_dict().items()}, str(dit))
    vae = MODELS / "vae" / "sdxl_vae.safetensors"
    if not vae.exists():
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        m = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                          up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                          sample_size=1024, scaling_factor=0.13025)
        save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, str(vae))


OURS = r"""
import asyncio, json, sys, time, tempfile, torch
from pathlib import Path
sys.path.insert(0, {comfy!r})
from comfy.cli_args import args
base = Path(tempfile.mkdtemp())
(base / "custom_nodes").mkdir(); (base / "models").symlink_to({models!r})
(base / "custom_nodes" / "pixart_sigma_nodes").symlink_to({root!r})
args.base_directory = str(base)
SMOKE = {smoke}
if SMOKE:  # CPU smoke test of this script with tiny models: no CUDA statistics
    args.cpu = True
    for name in ("reset_peak_memory_stats", "synchronize"):
        setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
import folder_paths, comfy.model_management as mm, nodes
asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
N = nodes.NODE_CLASS_MAPPINGS
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
with torch.inference_mode():
    t5 = N["PixArtSigmaT5Loader"].execute(t5_name="t5xxl_fp16.safetensors", quantization={quant!r}, dtype="bf16").result[0]
    pos, neg = N["PixArtSigmaTextEncode"].execute(t5=t5, positive={prompt!r}, negative="", max_tokens=300).result
    after_t5 = torch.cuda.max_memory_allocated()
    dit = N["PixArtSigmaDiTLoader"].execute(dit_name="PixArt-Sigma-XL-2-1024-MS.safetensors", variant="auto", dtype="bf16").result[0]
    lat = N["PixArtSigmaSampler"].execute(dit=dit, positive=pos, negative=neg, seed=0, steps={steps}, cfg=4.5,
        scheduler="dpm++ 2m", width={size}, height={size}, batch_size=1).result[0]
    vae = N["PixArtSigmaVAELoader"].execute(vae_name="sdxl_vae.safetensors", dtype="bf16").result[0]
    img = N["PixArtSigmaVAEDecode"].execute(vae=vae, samples=lat).result[0]
torch.cuda.synchronize()
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_allocated": torch.cuda.max_memory_allocated(),
    "peak_reserved": torch.cuda.max_memory_reserved(), "peak_during_t5": after_t5, "image": list(img.shape),
    "finite": bool(torch.isfinite(img).all())}}))
"""

DIFFUSERS = r"""
import gc, json, os, sys, tempfile, time, torch
from pathlib import Path
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel, AutoencoderKL
from transformers import AutoTokenizer, BitsAndBytesConfig, T5Config, T5EncoderModel
from safetensors.torch import load_file
sys.path.insert(0, {root!r})
from pixart_core import t5 as ct5, files
models = Path({models!r})
tmp = Path(tempfile.mkdtemp())
cfg = ct5.config_from_shapes(files.read_shapes(models / "text_encoders/t5xxl_fp16.safetensors"), "t5")
cfg.save_pretrained(tmp); os.symlink(models / "text_encoders/t5xxl_fp16.safetensors", tmp / "model.safetensors")
tok = AutoTokenizer.from_pretrained({tokenizer!r})
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
text_encoder = T5EncoderModel.from_pretrained(tmp, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto")
pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder, transformer=None, vae=None,
                           scheduler=__import__("pixart_core.sampling", fromlist=["x"]).make_scheduler("dpm++ 2m"))
with torch.no_grad():
    pe, pm, ne, nm = pipe.encode_prompt({prompt!r}, negative_prompt="", device="cuda")
after_t5 = torch.cuda.max_memory_allocated()
del text_encoder, pipe; gc.collect(); torch.cuda.empty_cache()
dit = PixArtTransformer2DModel(sample_size=128, interpolation_scale=2.0, use_additional_conditions=False,
    caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000)
dit.load_state_dict(load_file(models / "checkpoints/PixArt-Sigma-XL-2-1024-MS.safetensors"))
dit = dit.to("cuda", torch.bfloat16)
pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, transformer=dit, vae=None,
                           scheduler=__import__("pixart_core.sampling", fromlist=["x"]).make_scheduler("dpm++ 2m"))
g = torch.Generator("cpu").manual_seed(0)
latents = pipe(negative_prompt=None, prompt_embeds=pe.to(torch.bfloat16), prompt_attention_mask=pm,
               negative_prompt_embeds=ne.to(torch.bfloat16), negative_prompt_attention_mask=nm, num_inference_steps={steps},
               guidance_scale=4.5, height={size}, width={size}, generator=g, output_type="latent",
               use_resolution_binning=False).images
del pipe, dit; gc.collect(); torch.cuda.empty_cache()
vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=1024, scaling_factor=0.13025)
vae.load_state_dict(load_file(models / "vae/sdxl_vae.safetensors")); vae = vae.to("cuda", torch.bfloat16)
with torch.no_grad():
    img = vae.decode(latents.to(torch.bfloat16) / vae.config.scaling_factor).sample
torch.cuda.synchronize()
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_allocated": torch.cuda.max_memory_allocated(),
    "peak_reserved": torch.cuda.max_memory_reserved(), "peak_during_t5": after_t5, "image": list(img.shape),
    "finite": bool(torch.isfinite(img).all())}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="ours-none,ours-8bit,ours-nf4,diffusers-8bit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=str(OUT / "gpu_memory.json"))
    ap.add_argument("--cpu-smoke", metavar="MODELS_DIR", help="check this script on the CPU with tiny models laid out "
                    "like bench/out/gpu_models (text_encoders/t5xxl_fp16.safetensors, ...); ours-* modes only")
    a = ap.parse_args()
    import torch

    global MODELS
    if a.cpu_smoke:
        MODELS = Path(a.cpu_smoke)
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_memory.py needs an NVIDIA GPU (torch.cuda.is_available() is False).")
    t = time.perf_counter()
    if not a.cpu_smoke:
        prepare()
    print(f"weights ready in {time.perf_counter() - t:.0f} s ({MODELS})")
    quants = {"none": "none", "8bit": "8-bit (bitsandbytes)", "nf4": "4-bit nf4 (bitsandbytes)"}
    fmt = dict(smoke=bool(a.cpu_smoke), root=str(ROOT), comfy=str(COMFY), models=str(MODELS), prompt=PROMPT, steps=a.steps, size=a.size,
               tokenizer=str(COMFY / "comfy" / "text_encoders" / "t5_tokenizer"))
    rows = []
    for mode in a.modes.split(","):
        code = DIFFUSERS.format(**fmt) if mode.startswith("diffusers") else OURS.format(quant=quants[mode.split("-")[1]], **fmt)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            print(f"{mode}: failed\n{r.stderr[-3000:]}")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["mode"] = mode
        rows.append(row)
    gib = 2**30
    device = "CPU smoke test" if a.cpu_smoke else torch.cuda.get_device_name()
    print(f"{device}, {a.size}px, {a.steps} steps, torch {torch.__version__}")
    print(f"{'mode':<16}{'seconds':>9}{'peak alloc GiB':>16}{'peak reserved GiB':>19}{'peak in T5 GiB':>16}")
    for r in rows:
        print(f"{r['mode']:<16}{r['seconds']:>9.1f}{r['peak_allocated'] / gib:>16.2f}{r['peak_reserved'] / gib:>19.2f}"
              f"{r['peak_during_t5'] / gib:>16.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""The bench weight set: one set of random full-size weights (harness.models preset "bench") written in every layout.

A PixArt-Σ XL/2 512-family transformer (28 blocks, hidden 1152, 16 heads, caption width 4096; parameters scaled
down so outputs stay finite), a T5-v1.1 encoder with the real width 4096 / FFN 10240 / 64 heads / 32128 vocab but
only a few blocks, and a full SDXL VAE architecture, all random. The 512 family is used because ComfyUI's built-in
PixArt cannot run a 256 px image with 1024-family weights (its position-embedding scale rounds to 0).

Files are written under a ComfyUI base folder (default bench/out/w-dit28-t5l2/), so ComfyUI workers use it
directly as --base-directory:
  models/diffusion_models/PixArt-Sigma-XL-2-512-MS.safetensors   original key layout (+ pos_embed, y_embedding)
  models/checkpoints/PixArt-Sigma-XL-2-512-MS.pth                 the same, as torch.save (the release format)
  models/diffusion_models/PixArt-Sigma-XL-2-512-MS-diffusers.safetensors  diffusers keys, one file
  models/text_encoders/t5-w4096-l2_fp16.safetensors               T5 single file (encoder keys + shared), fp16
  models/vae/sdxl_vae.safetensors                                 LDM keys, fp32 (as stabilityai/sdxl-vae)
  models/diffusers/PixArt-Sigma-XL-2-512-MS/                      diffusers pipeline folder (same weights)

    python -m bench.weights DIT_LAYERS T5_LAYERS [--rebuild]   # (in its own process: see build())
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from harness import models
from harness.comfyui import make_base
from harness.location import REPO, comfyui_path

from .measure import emit, log, run_worker

OUT = REPO / "bench" / "out"
SPEC_VERSION = 1
VARIANT = "sigma-512"
DIT_NAME = "PixArt-Sigma-XL-2-512-MS"
DIT_FILE = f"{DIT_NAME}.safetensors"
DIT_PTH = f"{DIT_NAME}.pth"
DIT_DIFFUSERS_FILE = f"{DIT_NAME}-diffusers.safetensors"
VAE_FILE = "sdxl_vae.safetensors"
PROMPT = "A small cactus with a happy face in the Sahara desert, photorealistic, golden hour"
SEEDS = {"dit": 0, "t5": 1, "vae": 2}


def t5_file(t5_layers: int) -> str:
    return f"t5-w4096-l{t5_layers}_fp16.safetensors"


def work_dir(dit_layers: int, t5_layers: int) -> Path:
    return OUT / f"w-dit{dit_layers}-t5l{t5_layers}"


def dit_to_original(sd: dict, tokens: int = 300, pos_tokens: int = 1024) -> dict:
    """The original release's keys, with pos_embed and y_embedding shaped as released (the pos_embed's token count
    tells ComfyUI the family: 1024 tokens = 512 px)."""
    import torch

    width = sd["pos_embed.proj.weight"].shape[0]
    return models.dit_to_original(
        sd, pos_embed=torch.zeros(1, pos_tokens, width),
        y_embedding=torch.randn(tokens, sd["caption_projection.linear_1.weight"].shape[1]) * 0.02)


def ensure_weights(dit_layers: int = 28, t5_layers: int = 2, rebuild: bool = False) -> Path:
    """Write the weight set under work_dir() once; returns that ComfyUI base folder."""
    base = work_dir(dit_layers, t5_layers)
    marker = base / "models" / "complete.json"
    spec = {"version": SPEC_VERSION, "dit_layers": dit_layers, "t5_layers": t5_layers,
            "dit_scale": models.SIZES["bench"].dit_scale}
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == spec:
        make_base(base)
        return base
    import torch
    from safetensors.torch import save_file

    from pixart_core import schedulers

    t0 = time.perf_counter()
    if base.exists():
        shutil.rmtree(base)
    m = base / "models"
    for d in ("diffusion_models", "checkpoints", "text_encoders", "vae", "diffusers"):
        (m / d).mkdir(parents=True)
    log(f"building weights in {base} (DiT {dit_layers} blocks, T5 width 4096 x {t5_layers} blocks, SDXL VAE)")

    dit = models.make_dit("bench", SEEDS["dit"], VARIANT, layers=dit_layers)
    dsd = {k: v.contiguous() for k, v in dit.state_dict().items()}
    orig = dit_to_original(dsd)
    save_file(orig, str(m / "diffusion_models" / DIT_FILE))
    torch.save(orig, str(m / "checkpoints" / DIT_PTH))
    del orig
    save_file(dsd, str(m / "diffusion_models" / DIT_DIFFUSERS_FILE))
    pipe = m / "diffusers" / DIT_NAME
    dit.save_pretrained(pipe / "transformer", safe_serialization=True, max_shard_size="20GB")
    del dit, dsd

    t5 = models.make_t5("bench", SEEDS["t5"], layers=t5_layers)
    save_file(models.t5_single_file_sd(t5), str(m / "text_encoders" / t5_file(t5_layers)))
    t5.half().save_pretrained(pipe / "text_encoder", safe_serialization=True, max_shard_size="20GB")
    del t5

    vae = models.make_vae("bench", SEEDS["vae"])
    save_file(models.vae_to_ldm(vae.state_dict()), str(m / "vae" / VAE_FILE))
    vae.save_pretrained(pipe / "vae", safe_serialization=True)
    del vae

    models.copy_tokenizer(comfyui_path(), pipe / "tokenizer")
    schedulers.make(schedulers.DEFAULT).save_pretrained(pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    make_base(base)
    marker.write_text(json.dumps(spec))
    log(f"weights written in {time.perf_counter() - t0:.0f} s")
    return base


def build(dit_layers: int, t5_layers: int) -> Path:
    """ensure_weights in a child process (its memory is returned before anything is measured)."""
    run_worker(__spec__.name, [str(dit_layers), str(t5_layers)], OUT / "logs" / "build.log", timeout=1800)
    return work_dir(dit_layers, t5_layers)


if __name__ == "__main__":
    ensure_weights(int(sys.argv[1]), int(sys.argv[2]), rebuild="--rebuild" in sys.argv)
    emit({"base": str(work_dir(int(sys.argv[1]), int(sys.argv[2])))})

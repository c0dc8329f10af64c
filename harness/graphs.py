"""API-format graphs the tests queue: the full graph over the tiny models that models.write_models writes (and the
images it saved), the Advanced sampler node, and the example workflows (example_workflows/*.json) cut down for a CPU
and tiny models. Never imports ComfyUI at import time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .location import REPO
from .workflow import apply_overrides


# The files models.write_models writes into models/ (the single DiT and the diffusers pipeline folder).
DIT_FILE = "tiny-PixArt-Sigma-XL-2-1024-MS.safetensors"
PIPE = "tiny-PixArt-Sigma-XL-2-1024-MS"


def graph(t5="tiny_t5xxl_fp16.safetensors", quant="none", dit=DIT_FILE, vae="tiny_sdxl_vae.safetensors",
          seed=7, width=64, height=64, batch=1, prefix="pixart_test", positive="a red fox in the snow",
          negative="", steps=3, cfg=4.5, save_latent=False, **sampler):
    """An API-format prompt: T5 -> encode -> DiT -> sample -> decode -> SaveImage (+ SaveLatent). The DiT and VAE
    compute in fp32 (their `auto` is bf16 on CPUs with native bf16), so results compare with diffusers' fp32."""
    p = {
        "1": {"class_type": "PixArtSigmaT5Loader", "inputs": {"t5_name": t5, "quantization": quant, "dtype": "auto"}},
        "2": {"class_type": "PixArtSigmaTextEncode",
              "inputs": {"t5": ["1", 0], "positive": positive, "negative": negative, "max_tokens": 300}},
        "3": {"class_type": "PixArtSigmaDiTLoader", "inputs": {"dit_name": dit, "variant": "auto", "dtype": "fp32"}},
        "4": {"class_type": "PixArtSigmaSampler",
              "inputs": {"dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "seed": seed, "steps": steps,
                         "cfg": cfg, "scheduler": "dpm++ 2m", "width": width, "height": height, "batch_size": batch,
                         "denoise": 1.0, **sampler}},
        "5": {"class_type": "PixArtSigmaVAELoader", "inputs": {"vae_name": vae, "dtype": "fp32"}},
        "6": {"class_type": "PixArtSigmaVAEDecode", "inputs": {"vae": ["5", 0], "samples": ["4", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if save_latent:
        p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}}
    return p


def saved_images(result, comfy_base: Path) -> list[np.ndarray]:
    """The images graph()'s SaveImage (node 7) wrote under comfy_base/output, as arrays."""
    out = []
    for img in result["outputs"]["7"]["images"]:
        path = comfy_base / "output" / img["subfolder"] / img["filename"]
        out.append(np.asarray(Image.open(path)))
    return out


# PixArt-Σ Sampler (Advanced)'s inputs as the tests set them by default (one stage over the whole schedule).
ADVANCED = dict(add_noise="enable", seed=7, steps=4, cfg=4.5, scheduler="dpm++ 2m", start_step=0, end_step=10000,
                return_with_leftover_noise="disable", pag_scale=0.0, pag_layers="blocks.1", guidance_rescale=0.0,
                cfg_start=0.0, cfg_end=1.0, dmd_timestep=400)


def advanced_sampler(**inputs) -> dict:
    """A PixArt-Σ Sampler (Advanced) node on graph()'s DiT (node 3) and conditionings (node 2)."""
    return {"class_type": "PixArtSigmaSamplerAdvanced",
            "inputs": {"dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], **{**ADVANCED, **inputs}}}


def example(name: str) -> dict:
    """example_workflows/<name>.json, as the frontend saved it (UI format)."""
    return json.loads((REPO / "example_workflows" / f"{name}.json").read_text())


def shrink(prompt: dict) -> dict:
    """The examples' 512-2048 px / 20 steps, cut down for a CPU (and tiny models)."""
    for node in prompt.values():
        if node["class_type"] in ("PixArtSigmaSampler", "ImageScale", "EmptyLatentImage"):
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] in ("PixArtSigmaSampler", "KSampler"):
            node["inputs"]["steps"] = 2
        # 1024 -> 2K -> 4K as 64 -> 80 -> 96 px (the sdxl_vae stand-in is the released VAE's size: its passes cost
        # the most here): to a bin (2K) -> 80 px; to a set size (4K) -> 96 px
        if node["class_type"] == "PixArtSigmaHiresUpscale":
            side = 96 if node["inputs"]["width"] else 80
            node["inputs"].update(width=side, height=side)
        if node["class_type"] == "PixArtSigmaTiledRefine":  # 9 tiles of 48 px; 4 steps at denoise 0.35 run 1
            node["inputs"].update(steps=4, tile_width=48, tile_height=48, overlap=16)
    apply_overrides(prompt, {"steps": 4} if any(n["class_type"] == "PixArtSigmaSamplerAdvanced"
                                                for n in prompt.values()) else {})  # stages keep their share
    return prompt


def loaded_pack_models() -> list:
    """The pack's models that ComfyUI's model management holds now (their ModelPatchers)."""
    import comfy.model_management as mm

    return [m.model for m in mm.current_loaded_models if m.model is not None and hasattr(m.model.model, "inner")]


def healthy(executor, comfy, seed: int) -> None:
    """The next good prompt runs (a seed not used before, so the sampler really runs rather than coming from
    ComfyUI's cache), and model management does not hold the same model twice."""
    good = executor.run(graph(seed=seed))
    assert good["ok"], good["error"]
    ids = [id(p.model) for p in loaded_pack_models()]
    assert len(ids) == len(set(ids)), "a model is held twice by model management"

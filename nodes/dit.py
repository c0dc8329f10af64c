"""DiT loader and sampler nodes."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io, ui

from ..pixart_core import sampling
from ..pixart_core import transformer as core_dit
from ..pixart_core import vae as core_vae
from ..pixart_core.variants import PRESETS
from . import management, paths
from .types import CATEGORY, LATENT_SPACE_KEY, Conditioning, DiT, DiTHandle

log = logging.getLogger(__name__)
DIT_FOLDERS = ("checkpoints", "diffusion_models")
MAX_SIDE = 4096  # the largest side of any trained bin (2K family)


class DiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaDiTLoader",
            display_name="PixArt-Σ DiT Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a PixArt transformer (diffusers layout file or diffusers folder) and tells which variant it is.",
            inputs=[
                io.Combo.Input("dit_name", options=paths.choices(DIT_FOLDERS, "transformer"),
                               tooltip="A PixArt transformer in models/checkpoints or models/diffusion_models, "
                                       "or a diffusers folder in models/diffusers (e.g. PixArt-Sigma-XL-2-1024-MS)."),
                io.Combo.Input("variant", options=["auto", *PRESETS], default="auto",
                               tooltip="auto: from the weights, config and file name. 1024 and 2K weights have the same "
                                       "shapes, so name a 2K file '...2K...' or pick sigma-2k here."),
                io.Combo.Input("dtype", options=list(core_dit.DTYPES), default="auto",
                               tooltip="auto: what ComfyUI picks for its own PixArt on this device (fp16 on most NVIDIA "
                                       "GPUs and Macs, fp32 where neither fp16 nor bf16 is fast); on CPUs bf16 where "
                                       "bf16 is native (AVX512-BF16, AMX), else fp32."),
            ],
            outputs=[DiT.Output(display_name="dit")],
        )

    @classmethod
    def execute(cls, dit_name: str, variant: str, dtype: str) -> io.NodeOutput:
        path = paths.resolve(dit_name, DIT_FOLDERS)
        load_device, offload_device = management.dit_devices()
        compute = core_dit.compute_dtype(dtype, management.auto_dtype("dit", load_device))
        model, found, how = core_dit.load_dit(path, variant, compute)
        text = f"{dit_name}: {found.name} ({how}); {found.resolution}px family, {found.max_tokens} tokens, {found.vae.upper()} VAE"
        log.info("PixArt DiT %s", text)
        handle = DiTHandle(management.wrap(model, load_device, offload_device), found, dit_name, how)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


def check_size(width: int, height: int) -> None:
    """Refuse sizes the DiT cannot take before anything is allocated, naming valid neighbours."""
    for label, v in (("width", width), ("height", height)):
        if v <= 0 or v > MAX_SIDE:
            raise ValueError(f"PixArt sampler: {label} {v} is outside 16..{MAX_SIDE}.")
        if v % 16:
            lo, hi = max(16, v // 16 * 16), v // 16 * 16 + 16
            raise ValueError(
                f"PixArt sampler: {label} {v} is not a multiple of 16 (patch 2 x VAE 8); use {lo} or {hi}."
            )


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaSampler",
            display_name="PixArt-Σ Sampler",
            category=f"{CATEGORY}/sampling",
            description="Denoises with the PixArt DiT as diffusers' PixArtSigmaPipeline does; outputs a ComfyUI LATENT.",
            inputs=[
                DiT.Input("dit", tooltip="The transformer from PixArt-Σ DiT Loader."),
                Conditioning.Input("positive", tooltip="Positive conditioning from PixArt-Σ Text Encode."),
                Conditioning.Input("negative", tooltip="Negative conditioning from PixArt-Σ Text Encode."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed. Noise is drawn on the CPU, so a seed gives the same image on any device."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Denoising steps (PixArt-Σ: 20 with dpm++ 2m)."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (PixArt-Σ: 4.5). 1 or less runs no negative pass."),
                io.Combo.Input("scheduler", options=list(sampling.SCHEDULERS), default=sampling.DEFAULT_SCHEDULER,
                               tooltip="diffusers scheduler; dpm++ 2m is configured as the official release."),
                io.Int.Input("width", default=1024, min=16, max=MAX_SIDE, step=16,
                             tooltip="Image width in pixels, a multiple of 16. Ignored when a latent is connected."),
                io.Int.Input("height", default=1024, min=16, max=MAX_SIDE, step=16,
                             tooltip="Image height in pixels, a multiple of 16. Ignored when a latent is connected."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run (one noise generator for the batch)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional image latent for img2img (e.g. from VAE Encode with the SDXL VAE)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="img2img strength: the share of the schedule that runs on the input latent."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, positive, negative, seed: int, steps: int, cfg: float, scheduler: str,
                width: int, height: int, batch_size: int, latent=None, denoise: float = 1.0) -> io.NodeOutput:
        scale = dit.variant.vae_scaling_factor
        init = None
        if latent is not None:
            space = latent.get(LATENT_SPACE_KEY)
            if space and space != dit.variant.vae:
                raise ValueError(
                    f"PixArt sampler: the input latent was encoded with {core_vae.FAMILY_NAMES[space]}, but "
                    f"{dit.name} ({dit.variant.name}) works in the {dit.variant.vae.upper()} latent space. "
                    f"Encode with {core_vae.FAMILY_NAMES[dit.variant.vae]}.")
            init = latent["samples"].float() * scale
            batch_size = max(batch_size, init.shape[0])
            height, width = init.shape[-2] * 8, init.shape[-1] * 8
        elif denoise < 1.0:
            raise ValueError("PixArt sampler: denoise below 1.0 needs an input latent (connect 'latent' for img2img).")
        check_size(width, height)
        limit = dit.variant.max_tokens
        fitted = [sampling.for_limit(c, limit) for c in (positive, negative)]
        if any(f is not c for f, c in zip(fitted, (positive, negative))):
            log.info("PixArt sampler: %s reads %d T5 tokens; using the prompt encoded at that limit.", dit.variant.name, limit)
        positive, negative = fitted
        longest = max(positive.mask.shape[1], negative.mask.shape[1])
        if longest > dit.variant.max_tokens:
            log.warning("PixArt sampler: %s was trained with %d T5 tokens but gets %d; set max_tokens to %d (or 0, from the DiT) in "
                        "Text Encode.", dit.variant.name, dit.variant.max_tokens, longest, dit.variant.max_tokens)
        if denoise <= 0.0:
            raise ValueError("PixArt sampler: denoise 0 runs no step; use a value in (0, 1].")
        noise, generator = sampling.initial_noise(seed, batch_size, 4, height, width)
        p = dit.patcher
        inner = p.model.inner
        need = sampling.inference_memory(batch_size, height, width, inner.inner_dim, inner.dtype, cfg > 1.0,
                                         fused_attention=management.fused_attention(p.load_device, inner.dtype))
        ready = management.use(p, memory_required=need)
        latents = sampling.sample(ready.model, positive, negative, noise, steps=steps, cfg=cfg, scheduler_name=scheduler,
                                  generator=generator, init_latents=init, denoise=denoise, device=ready.device,
                                  on_step=management.step_callback(steps, dit.variant.vae, ready.device))
        return io.NodeOutput({"samples": (latents / scale).to(management.intermediate_device()),
                              LATENT_SPACE_KEY: dit.variant.vae})


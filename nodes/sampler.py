"""Sampler node: the denoising loop (pixart_core.sampling) under ComfyUI's model management."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..pixart_core import resolution, sampling
from ..pixart_core import vae as core_vae
from . import management
from .types import CATEGORY, LATENT_SPACE_KEY, ConditioningType, DiT, DiTHandle

log = logging.getLogger(__name__)


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
                ConditioningType.Input("positive", tooltip="Positive conditioning from PixArt-Σ Text Encode."),
                ConditioningType.Input("negative", tooltip="Negative conditioning from PixArt-Σ Text Encode."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed. Noise is drawn on the CPU, so a seed gives the same image on any device."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Denoising steps (PixArt-Σ: 20 with dpm++ 2m)."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (PixArt-Σ: 4.5). 1 or less runs no negative pass."),
                io.Combo.Input("scheduler", options=list(sampling.SCHEDULERS), default=sampling.DEFAULT_SCHEDULER,
                               tooltip="diffusers scheduler; dpm++ 2m is configured as the official release."),
                io.Int.Input("width", default=1024, min=16, max=resolution.MAX_SIDE, step=16,
                             tooltip="Image width in pixels, a multiple of 16. Ignored when a latent is connected."),
                io.Int.Input("height", default=1024, min=16, max=resolution.MAX_SIDE, step=16,
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
            core_vae.check_pairing(latent.get(LATENT_SPACE_KEY), dit.variant.vae, f"{dit.name} ({dit.variant.name})",
                                   sampler=True)
            init = latent["samples"].float() * scale
            batch_size = max(batch_size, init.shape[0])
            height, width = init.shape[-2] * 8, init.shape[-1] * 8
        sampling.check_denoise(denoise, steps, img2img=init is not None)
        resolution.check_size(width, height)
        limit = dit.variant.max_tokens
        fitted = [sampling.for_limit(c, limit) for c in (positive, negative)]
        if any(f is not c for f, c in zip(fitted, (positive, negative))):
            log.info("PixArt sampler: %s reads %d T5 tokens; using the prompt encoded at that limit.", dit.variant.name, limit)
        positive, negative = fitted
        longest = max(positive.mask.shape[1], negative.mask.shape[1])
        if longest > limit:
            log.warning("PixArt sampler: %s was trained with %d T5 tokens but gets %d; set max_tokens to %d (or 0, "
                        "from the DiT) in Text Encode.", dit.variant.name, limit, longest, limit)
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


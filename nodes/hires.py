"""Hires nodes: upscale a result to a larger trained bin (for img2img with the larger model in the Sampler), and
refine a canvas past the largest bin in overlapping tiles of a trained size (pixart_core.tiles)."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..pixart_core import conditioning, dit_memory, hires, resolution, sampling
from ..pixart_core import tiles as core_tiles
from ..pixart_core import vae as core_vae
from ..pixart_core.guidance import Guidance
from ..pixart_core.request import Request, check_inputs
from . import control_jobs, scheduler_labels
from .comfy import devices, progress
from .search_aliases import search_aliases
from .types import CATEGORY, LATENT_SPACE_KEY, VAE, ConditioningType, DiT, DiTHandle, VAEHandle
from .vae_jobs import load_for, run_tiled
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))
VIA_VAE = "vae (decode, upscale, encode)"
VIA_LATENT = "latent"
HIRES_DENOISE = 0.5  # the hires img2img pass (Sampler's denoise); see docs/4k.md
TILED_DENOISE = 0.35


class HiresUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaHiresUpscale",
            display_name="PixArt-Σ Hires Upscale",
            category=f"{CATEGORY}/latent",
            description="Upscales a LATENT to the nearest trained bin of a larger family (e.g. a 1024 result to a 2K "
                        f"bin) or to any size for PixArt-Σ Tiled Refine. Feed it to the Sampler's latent with the "
                        f"larger model and denoise ~{HIRES_DENOISE}.",
            **search_aliases("pixart sigma hires upscale", "hires fix", "upscale latent", "2k", "4k"),
            inputs=[
                io.Latent.Input("samples", tooltip="The first result (e.g. from PixArt-Σ Sampler at 1024)."),
                io.Combo.Input("family", options=[str(f) for f in reversed(resolution.FAMILIES)], default="2048",
                               tooltip="Upscale to this family's trained bin nearest the image's aspect ratio "
                                       "(2048: the 2K model's bins, 2048x2048, 2560x1536, ...)."),
                io.Combo.Input("method", options=[VIA_VAE, VIA_LATENT], default=VIA_VAE,
                               tooltip="vae: decode, upscale the pixels, encode again (needs the VAE; sharper start, "
                                       "the default). latent: interpolate the latents (no VAE pass; blurrier, needs "
                                       "more denoise)."),
                io.Combo.Input("upscale_mode", options=list(hires.UPSCALE_MODES), default="bicubic",
                               tooltip="Interpolation of the pixels (or latents)."),
                io.Int.Input("width", default=0, min=0, max=16384, step=16,
                             tooltip="0: the family's bin. Else an explicit width (multiple of 16), e.g. 3840 for 4K "
                                     "by tiles."),
                io.Int.Input("height", default=0, min=0, max=16384, step=16,
                             tooltip="0: the family's bin. Else an explicit height (multiple of 16), e.g. 2160."),
                VAE.Input("vae", optional=True, tooltip="The VAE from PixArt-Σ VAE Loader (for method 'vae')."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The upscaled latent, for the Sampler's latent "
                                                                    "(img2img) or Tiled Refine."),
                     io.Int.Output("WIDTH", display_name="width", tooltip="The upscaled width in pixels."),
                     io.Int.Output("HEIGHT", display_name="height", tooltip="The upscaled height in pixels.")],
        )

    @classmethod
    def execute(cls, samples, family: str, method: str, upscale_mode: str, width: int, height: int,
                vae: VAEHandle | None = None) -> io.NodeOutput:
        latents = samples["samples"]
        space = samples.get(LATENT_SPACE_KEY)
        w, h = hires.target_size(latents.shape[-1] * 8, latents.shape[-2] * 8, int(family), width, height)
        if method == VIA_LATENT:
            up = hires.upscale_latents(latents, w, h, upscale_mode)
        else:
            if vae is None:
                raise ValueError("PixArt hires upscale: method 'vae' needs a VAE; connect PixArt-Σ VAE Loader or "
                                 "choose method 'latent'.")
            core_vae.check_pairing(space, vae.family, vae.name)
            inner = vae.patcher.model.inner
            dtype, base = inner.dtype, inner.config.block_out_channels[0]
            size = f"{latents.shape[-1] * 8}x{latents.shape[-2] * 8}"
            ready, tiled = load_for(vae, core_vae.decode_memory(tuple(latents.shape), dtype, base), "auto")
            images = run_tiled(lambda t: core_vae.decode(ready.model, latents, tiled=t, device=ready.device),
                               tiled, "auto", "decode", size)
            images = hires.upscale_images(images, w, h, upscale_mode)
            progress.check_interrupt()
            ready, tiled = load_for(vae, core_vae.encode_memory((1, h, w, 3), dtype, base) * images.shape[0], "auto")
            up = run_tiled(lambda t: core_vae.encode(ready.model, images, tiled=t, device=ready.device),
                           tiled, "auto", "encode", f"{w}x{h}")
            space = space or vae.family
        out = {"samples": up.to(devices.intermediate_device())}
        if space:
            out[LATENT_SPACE_KEY] = space
        return io.NodeOutput(out, w, h)


class TiledRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaTiledRefine",
            display_name="PixArt-Σ Tiled Refine",
            category=f"{CATEGORY}/sampling",
            description="img2img on a latent larger than the model's trained sizes (e.g. 3840x2160 with the 2K model): "
                        "each step denoises overlapping tiles of a trained bin and blends them (MultiDiffusion); "
                        "memory is one tile's.",
            **search_aliases("pixart sigma tiled refine", "tiled diffusion", "multidiffusion", "4k", "upscale"),
            inputs=[
                DiT.Input("dit", tooltip="The transformer (the 2K model for 4K)."),
                ConditioningType.Input("positive", tooltip="Positive conditioning from PixArt-Σ Text Encode."),
                ConditioningType.Input("negative", tooltip="Negative conditioning from PixArt-Σ Text Encode."),
                io.Latent.Input("latent", tooltip="The upscaled latent (from PixArt-Σ Hires Upscale)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (noise for the whole canvas, drawn on the CPU)."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Steps of the whole schedule; denoise x steps of them run."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (PixArt-Σ: 4.5)."),
                io.Combo.Input("scheduler", options=scheduler_labels.options(one_step=False),
                               default=scheduler_labels.DEFAULT, tooltip="diffusers scheduler."),
                io.Float.Input("denoise", default=TILED_DENOISE, min=0.01, max=1.0, step=0.01,
                               tooltip="The share of the schedule that runs: low keeps the composition (each tile "
                                       "sees only its part of the image), high invents detail per tile."),
                io.Int.Input("tile_width", default=0, min=0, max=resolution.MAX_SIDE, step=16,
                             tooltip="0: the DiT's trained bin nearest the image's aspect ratio. Else a width in "
                                     "pixels (multiple of 16)."),
                io.Int.Input("tile_height", default=0, min=0, max=resolution.MAX_SIDE, step=16,
                             tooltip="0: the DiT's trained bin nearest the image's aspect ratio. Else a height."),
                io.Int.Input("overlap", default=256, min=0, max=2048, step=16,
                             tooltip="Least overlap of neighbouring tiles in pixels, blended with linear ramps."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The refined latent, for VAE Decode "
                                                                    "(tiling always at 4K).")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, positive, negative, latent, seed: int, steps: int, cfg: float, scheduler: str,
                denoise: float, tile_width: int, tile_height: int, overlap: int) -> io.NodeOutput:
        core_vae.check_pairing(latent.get(LATENT_SPACE_KEY), dit.variant.vae, f"{dit.name} ({dit.variant.name})",
                               sampler=True)
        init = latent["samples"].float() * dit.variant.vae_scaling_factor
        batch, height, width = init.shape[0], init.shape[-2] * 8, init.shape[-1] * 8
        positive, negative = conditioning.fit(positive, negative, dit.variant.max_tokens, dit.variant.name)
        request = Request(positive, negative, width, height, steps, Guidance(cfg),
                          scheduler=scheduler_labels.to_id(scheduler), denoise=denoise, init_latents=init, tiled=True)
        p = dit.patcher
        inner = p.model.inner
        check_inputs(request, inner)
        layout, (tw, th) = hires.tiling(width, height, dit.variant.resolution, tile_width, tile_height, overlap)
        log.info("PixArt tiled refine: %dx%d in %d tiles of %dx%d", width, height, len(layout), tw, th)
        noise, generator = sampling.initial_noise(seed, batch, 4, height, width)
        need = dit_memory.inference_memory(batch, th, tw, inner.inner_dim, inner.dtype, cfg > 1.0,  # one tile's
                                           fused_attention=devices.fused_attention(p.load_device, inner.dtype))
        passes = 2 if cfg > 1.0 else 1
        ready = control_jobs.load(dit, (height // 8, width // 8), batch, (batch * passes, th, tw), need)
        on_step, on_tile = progress.tiled_step_callbacks(min(int(steps * denoise), steps), len(layout),
                                                           dit.variant.vae, ready.device)
        model = core_tiles.TiledDiT(ready.model, layout, (height // 8, width // 8), on_tile)
        latents, _ = sampling.run(model, request, noise, generator, ready.device, on_step)
        return io.NodeOutput({"samples": (latents / dit.variant.vae_scaling_factor).to(devices.intermediate_device()),
                              LATENT_SPACE_KEY: dit.variant.vae})

"""Sampler nodes: the denoising loop (pixart_core.sampling) under ComfyUI's model management. The plain sampler
does text-to-image, img2img and inpainting; the advanced one adds staged sampling (as KSamplerAdvanced) and the
guidance options."""
from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io

from ..pixart_core import conditioning, dit_memory, resolution, sampling, stages
from ..pixart_core import vae as core_vae
from ..pixart_core.guidance import Guidance
from ..pixart_core.request import Request, check_inputs
from ..pixart_core.schedulers import DMD_TIMESTEP
from . import control_jobs, scheduler_labels
from .comfy import devices, progress
from .search_aliases import search_aliases
from .types import CATEGORY, LATENT_SPACE_KEY, ConditioningType, DiT, DiTHandle
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))

MASK_TOOLTIP = ("Optional inpainting mask (1 = repaint), e.g. Load Image's MASK; resized to the latent as ComfyUI's "
                "KSampler does. Replaces the latent's own noise_mask (Set Latent Noise Mask). Needs 'latent'.")


def _common_inputs() -> list:
    return [
        DiT.Input("dit", tooltip="The transformer from PixArt-Σ DiT Loader."),
        ConditioningType.Input("positive", tooltip="Positive conditioning from PixArt-Σ Text Encode."),
        ConditioningType.Input("negative", tooltip="Negative conditioning from PixArt-Σ Text Encode."),
    ]


def _seed_steps_cfg_scheduler() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed. Noise is drawn on the CPU, so a seed gives the same image on any device."),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Denoising steps (PixArt-Σ: 20 with dpm++ 2m)."),
        io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale (PixArt-Σ: 4.5). 1 or less runs no negative pass."),
        io.Combo.Input("scheduler", options=scheduler_labels.options(), default=scheduler_labels.DEFAULT,
                       tooltip="diffusers scheduler; dpm++ 2m is configured as the official release."),
    ]


def _inpaint_mask(latent: dict | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The repaint mask: the MASK input, else the LATENT's noise_mask (both resized in the loop, as ComfyUI does)."""
    if mask is not None:
        if latent is not None and "noise_mask" in latent:
            log.info("PixArt sampler: the mask input replaces the latent's noise_mask.")
        return mask
    return None if latent is None else latent.get("noise_mask")


def _run(dit: DiTHandle, positive, negative, seed: int, batch_size: int, size: tuple[int, int], latent: dict | None,
         mask: torch.Tensor | None, guidance: Guidance, empty_start: bool = False, **settings):
    """The widgets as a Request, checked, then sampled under model management: ((model-space latents, SolverState or
    None), the VAE scale). `settings`: the Request's schedule fields."""
    scale = dit.variant.vae_scaling_factor
    (width, height), init = size, None
    if latent is not None:
        core_vae.check_pairing(latent.get(LATENT_SPACE_KEY), dit.variant.vae, f"{dit.name} ({dit.variant.name})",
                               sampler=True)
        init = latent["samples"].float() * scale
        batch_size = max(batch_size, init.shape[0])
        height, width = init.shape[-2] * 8, init.shape[-1] * 8
    mask = _inpaint_mask(latent, mask)
    if empty_start and mask is None:
        init = None  # an empty latent sampled from the start: pure noise, as KSampler's full denoise gives
    positive, negative = conditioning.fit(positive, negative, dit.variant.max_tokens, dit.variant.name)
    request = Request(positive, negative, width, height, guidance=guidance, init_latents=init, mask=mask, **settings)
    p = dit.patcher
    inner = p.model.inner
    check_inputs(request, inner)
    noise, generator = sampling.initial_noise(seed, batch_size, 4, height, width)
    passes = (2 if guidance.cfg > 1.0 else 1) + (1 if guidance.pag_scale > 0 else 0)
    need = dit_memory.inference_memory(batch_size * passes, height, width, inner.inner_dim, inner.dtype, False,
                                       fused_attention=devices.fused_attention(p.load_device, inner.dtype))
    ready = control_jobs.load(dit, (height // 8, width // 8), batch_size, (batch_size * passes, height, width), need)
    on_step = progress.step_callback(request.steps, dit.variant.vae, ready.device)
    return sampling.run(ready.model, request, noise, generator, ready.device, on_step), scale


def _output(dit: DiTHandle, latent: dict | None, latents: torch.Tensor, scale: float,
            state: stages.SolverState | None = None) -> dict:
    """A LATENT as ComfyUI's samplers return one: the input's other keys (noise_mask, batch_index) kept."""
    out = {k: v for k, v in (latent or {}).items() if k not in ("samples", stages.STATE_KEY)}
    out.update(samples=(latents / scale).to(devices.intermediate_device()), **{LATENT_SPACE_KEY: dit.variant.vae})
    if state is not None:
        out[stages.STATE_KEY] = state
    return out


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaSampler",
            display_name="PixArt-Σ Sampler",
            category=f"{CATEGORY}/sampling",
            description="Denoises with the PixArt DiT as diffusers' PixArtSigmaPipeline does; outputs a ComfyUI LATENT.",
            **search_aliases("pixart sigma sampler", "ksampler", "txt2img", "img2img", "inpaint"),
            inputs=[
                *_common_inputs(),
                *_seed_steps_cfg_scheduler(),
                io.Int.Input("width", default=1024, min=16, max=resolution.MAX_SIDE, step=16,
                             tooltip="Image width in pixels, a multiple of 16. Ignored when a latent is connected."),
                io.Int.Input("height", default=1024, min=16, max=resolution.MAX_SIDE, step=16,
                             tooltip="Image height in pixels, a multiple of 16. Ignored when a latent is connected."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run (one noise generator for the batch)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional image latent for img2img (e.g. from VAE Encode with the SDXL VAE); "
                                        "with a noise_mask (Set Latent Noise Mask) only the masked part is repainted."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="img2img strength: the share of the schedule that runs on the input latent."),
                io.Mask.Input("mask", optional=True, tooltip=MASK_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The denoised latent (raw VAE latents, as "
                                                                    "ComfyUI's samplers give), for VAE Decode.")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, positive, negative, seed: int, steps: int, cfg: float, scheduler: str,
                width: int, height: int, batch_size: int, latent=None, denoise: float = 1.0,
                mask=None) -> io.NodeOutput:
        (latents, _), scale = _run(dit, positive, negative, seed, batch_size, (width, height), latent, mask,
                                   Guidance(cfg), steps=steps, scheduler=scheduler_labels.to_id(scheduler),
                                   denoise=denoise)
        return io.NodeOutput(_output(dit, latent, latents, scale))


class SamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaSamplerAdvanced",
            display_name="PixArt-Σ Sampler (Advanced)",
            category=f"{CATEGORY}/sampling",
            description="PixArt-Σ Sampler with KSamplerAdvanced's staged sampling (start/end step, leftover noise) "
                        "and guidance options: perturbed-attention guidance, CFG rescale, a CFG interval; the DMD "
                        "timestep.",
            **search_aliases("pixart sigma sampler advanced", "ksampler advanced", "pag", "two stage", "refiner"),
            inputs=[
                *_common_inputs(),
                io.Latent.Input("latent", tooltip="Empty Latent Image to start from noise; VAE Encode for img2img; "
                                                  "a first stage's output (leftover noise) to go on."),
                io.Combo.Input("add_noise", options=["enable", "disable"], default="enable",
                               tooltip="disable: the latent is already noisy (a first stage's leftover noise)."),
                *_seed_steps_cfg_scheduler(),
                io.Int.Input("start_step", default=0, min=0, max=10000,
                             tooltip="First step of the schedule this stage runs (KSamplerAdvanced's start_at_step)."),
                io.Int.Input("end_step", default=10000, min=0, max=10000,
                             tooltip="Step this stage stops at (KSamplerAdvanced's end_at_step; past steps = the end)."),
                io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"], default="disable",
                               tooltip="enable: stop with the noise still in (for a second stage); disable: an early "
                                       "stop jumps to the clean estimate, as KSamplerAdvanced does."),
                io.Float.Input("pag_scale", default=0.0, min=0.0, max=20.0, step=0.1, round=0.01,
                               tooltip="Perturbed-attention guidance scale (diffusers' PixArtSigmaPAGPipeline; its "
                                       "default 3.0). 0 = off; on, each step runs one more forward."),
                io.String.Input("pag_layers", default="blocks.1",
                                tooltip="Self-attention layers PAG perturbs, as diffusers' pag_applied_layers: regular "
                                        "expressions, comma-separated, searched in the block names. The default is "
                                        "diffusers' PixArtSigmaPAGPipeline's, which matches blocks 1 and 10-19; "
                                        "'blocks.14' is block 14 alone (diffusers' documented example)."),
                io.Float.Input("guidance_rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="CFG rescale (diffusers' guidance_rescale, Lin et al. 2023: 0.7 suggested); 0 = off."),
                io.Float.Input("cfg_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="CFG runs from this fraction of the schedule..."),
                io.Float.Input("cfg_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="...to this one; outside, one positive-only pass per step (about half the cost)."),
                io.Int.Input("dmd_timestep", default=DMD_TIMESTEP, min=0, max=999,
                             tooltip="The one step of the dmd scheduler (the PixArt-α DMD release: 400)."),
                io.Mask.Input("mask", optional=True, tooltip=MASK_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The latent after this stage: clean, or with "
                                                                    "its leftover noise and solver state for a "
                                                                    "next stage (KSamplerAdvanced's form).")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle, positive, negative, latent, add_noise: str, seed: int, steps: int, cfg: float,
                scheduler: str, start_step: int, end_step: int, return_with_leftover_noise: str, pag_scale: float,
                pag_layers: str, guidance_rescale: float, cfg_start: float, cfg_end: float, dmd_timestep: int,
                mask=None) -> io.NodeOutput:
        # An Empty Latent Image sampled from the start is text-to-image (as KSampler's full denoise gives).
        empty = start_step == 0 and add_noise == "enable" and not bool(latent["samples"].any())
        guidance = Guidance(cfg, pag_scale, pag_layers, guidance_rescale, cfg_start, cfg_end)
        (latents, state), scale = _run(
            dit, positive, negative, seed, 1, (16, 16), latent, mask, guidance, empty_start=empty, steps=steps,
            scheduler=scheduler_labels.to_id(scheduler), start_step=start_step, end_step=end_step,
            add_noise=add_noise == "enable", leftover_noise=return_with_leftover_noise == "enable",
            resume=latent.get(stages.STATE_KEY), dmd_timestep=dmd_timestep)
        return io.NodeOutput(_output(dit, latent, latents, scale, state))

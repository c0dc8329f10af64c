"""ControlNets at sampling time: each Apply's hint encoded at the generation's size (once per size, kept on the Apply's
output), then the DiT loaded together with its ControlNets under ComfyUI's model management, as one model for the
sampling loop (pixart_core.controlnet.ControlledDiT)."""
from __future__ import annotations

import logging

import torch

from ..pixart_core import controlnet as cn
from ..pixart_core import dit_memory
from ..pixart_core import vae as core_vae
from ..pixart_core.logs import logger_name
from .comfy import loading
from .types import AppliedControl, DiTHandle
from .vae_jobs import load_for, run_tiled

log = logging.getLogger(logger_name(__name__))
HINT_SIZES = 2  # hint sizes kept per Apply (e.g. a first pass and a hires pass): the oldest goes first


def hint(applied: AppliedControl, latent_size: tuple[int, int], scale: float) -> torch.Tensor:
    """The Apply's hint latents for a generation of `latent_size` (h, w) latent pixels, [B, 4, h, w] on the CPU: as
    the reference app makes them, the control image scaled to cover the generation's size and centre-cropped,
    mapped to [-1, 1], VAE-encoded (posterior mean) and multiplied by the DiT's latent scale; kept on the Apply's
    output for later generations of that size."""
    cached = applied.hints.get(latent_size)
    if cached is not None:
        return cached
    vae = applied.vae
    inner = vae.patcher.model.inner
    factor = 2 ** (len(inner.config.block_out_channels) - 1)
    height, width = latent_size[0] * factor, latent_size[1] * factor
    images = cn.fit_image(applied.image.movedim(-1, 1).float(), height, width).movedim(1, -1)  # [B, H, W, 3]
    if tuple(applied.image.shape[1:3]) != (height, width):
        log.info("PixArt ControlNet %s: control image %dx%d scaled and centre-cropped to the generation's %dx%d.",
                 applied.controlnet.name, applied.image.shape[2], applied.image.shape[1], width, height)
    need = core_vae.encode_memory((1, height, width, 3), inner.dtype, inner.config.block_out_channels[0])
    ready, tiled = load_for(vae, need * images.shape[0], "auto")
    latents = run_tiled(lambda t: core_vae.encode(ready.model, images, tiled=t, device=ready.device),
                        tiled, "auto", "encode", f"{width}x{height}")
    hints = latents * scale
    while len(applied.hints) >= HINT_SIZES:
        applied.hints.pop(next(iter(applied.hints)))
    applied.hints[latent_size] = hints
    return hints


def load(dit: DiTHandle, latent_size: tuple[int, int], images: int, forward: tuple[int, int, int],
         memory_required: int) -> loading.Loaded:
    """The model a sampler runs and its device: the DiT as loading.use gives it, or, with ControlNets applied, a
    ControlledDiT of the DiT and its adapters, loaded by ComfyUI in one call after the hints were encoded (the
    VAE's turn comes first). `images`: the generation's batch; `forward`: (batch, height, width) of one DiT forward
    (a tile's for tiled sampling); `memory_required`: what that forward needs without ControlNets."""
    if not dit.controls:
        return loading.use(dit.patcher, memory_required=memory_required)
    hints = [hint(c, latent_size, dit.variant.vae_scaling_factor) for c in dit.controls]
    for c, h in zip(dit.controls, hints):
        if images % h.shape[0]:
            raise ValueError(f"PixArt ControlNet {c.controlnet.name}: {h.shape[0]} control images for a batch of "
                             f"{images}: give one control image for the whole batch, or one per image.")
    inner = dit.patcher.model.inner
    extra = dit_memory.control_memory(*forward, inner.inner_dim, inner.dtype, len(dit.controls))
    loaded = loading.use_together([dit.patcher, *(c.controlnet.patcher for c in dit.controls)],
                                  memory_required=memory_required + extra)
    controls = [cn.Control(ready.model, h, c.strength, c.start, c.end)
                for c, h, ready in zip(dit.controls, hints, loaded[1:])]
    return loading.Loaded(cn.ControlledDiT(loaded[0].model, controls), loaded[0].device)

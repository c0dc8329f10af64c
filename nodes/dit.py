"""DiT loader node."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io, ui

from ..pixart_core import transformer as core_dit
from ..pixart_core.variants import PRESETS
from .comfy import devices, loading, paths
from .search_aliases import search_aliases
from .types import CATEGORY, DiT, DiTHandle
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))
DIT_FOLDERS = ("checkpoints", "diffusion_models")


class DiTLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaDiTLoader",
            display_name="PixArt-Σ DiT Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a PixArt transformer (diffusers layout file or diffusers folder) and tells which variant it is.",
            **search_aliases("pixart sigma dit loader", "load checkpoint", "unet loader", "diffusion model",
                             "pixart alpha"),
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
            outputs=[DiT.Output(display_name="dit", tooltip="The PixArt transformer with its variant (resolution "
                                                            "family, token limit, VAE), for the samplers.")],
        )

    @classmethod
    def execute(cls, dit_name: str, variant: str, dtype: str) -> io.NodeOutput:
        path = paths.resolve(dit_name, DIT_FOLDERS)
        load_device, offload_device = devices.dit_devices()
        compute = core_dit.compute_dtype(dtype, devices.auto_dtype("dit", load_device))
        model, found, how = core_dit.load_dit(path, variant, compute)
        text = f"{dit_name}: {found.name} ({how}); {found.resolution}px family, {found.max_tokens} tokens, {found.vae.upper()} VAE"
        log.info("PixArt DiT %s", text)
        handle = DiTHandle(loading.wrap(model, load_device, offload_device), found, dit_name, how)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))

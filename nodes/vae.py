"""VAE loader and decode nodes."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..pixart_core import vae as core_vae
from . import management, paths
from .types import CATEGORY, VAE, VAEHandle

log = logging.getLogger(__name__)
VAE_FOLDERS = ("vae",)


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaVAELoader",
            display_name="PixArt-Σ VAE Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the VAE as a diffusers AutoencoderKL: the SDXL VAE for PixArt-Σ, the SD VAE for PixArt-α.",
            inputs=[
                io.Combo.Input("vae_name", options=paths.choices(VAE_FOLDERS, "vae"),
                               tooltip="A VAE file in models/vae (sdxl_vae.safetensors for Σ) or a diffusers folder in models/diffusers."),
                io.Combo.Input("dtype", options=list(core_vae.DTYPES), default="auto",
                               tooltip="Decode dtype. Never fp16: the SDXL VAE overflows in fp16. auto = bf16 on GPUs, fp32 on CPU."),
            ],
            outputs=[VAE.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        path = paths.resolve(vae_name, VAE_FOLDERS)
        load_device, offload_device = management.vae_devices()
        model = core_vae.load_vae(path, core_vae.compute_dtype(dtype, load_device))
        return io.NodeOutput(VAEHandle(management.wrap(model, load_device, offload_device), vae_name))


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaVAEDecode",
            display_name="PixArt-Σ VAE Decode",
            category=f"{CATEGORY}/latent",
            description="Decodes a ComfyUI LATENT (raw VAE latents) to an IMAGE, checking for NaN.",
            inputs=[
                VAE.Input("vae", tooltip="The VAE from PixArt-Σ VAE Loader."),
                io.Latent.Input("samples", tooltip="Latents from PixArt-Σ Sampler (or any SDXL-VAE latent)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, vae: VAEHandle, samples) -> io.NodeOutput:
        model = management.use(vae.patcher)
        management.check_interrupt()
        return io.NodeOutput(core_vae.decode(model, samples["samples"]))

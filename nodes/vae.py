"""VAE loader, decode and encode nodes."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..pixart_core import vae as core_vae
from ..pixart_core.resolution import check_multiple, optional_size
from .comfy import devices, loading, paths, progress
from .search_aliases import search_aliases
from .types import CATEGORY, LATENT_SPACE_KEY, VAE, VAEHandle
from .vae_jobs import load_for, run_tiled

VAE_FOLDERS = ("vae",)
TILING = ("auto", "always", "never")


class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaVAELoader",
            display_name="PixArt-Σ VAE Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the VAE as a diffusers AutoencoderKL: the SDXL VAE for PixArt-Σ, the SD VAE for PixArt-α.",
            **search_aliases("pixart sigma vae loader", "load vae", "sdxl vae"),
            inputs=[
                io.Combo.Input("vae_name", options=paths.choices(VAE_FOLDERS, "vae"),
                               tooltip="A VAE file in models/vae (sdxl_vae.safetensors for Σ) or a diffusers folder in models/diffusers."),
                io.Combo.Input("dtype", options=list(core_vae.DTYPES), default="auto",
                               tooltip="Decode dtype. Never fp16: the SDXL VAE overflows in fp16. auto = what ComfyUI picks "
                                       "for its SDXL VAE (bf16 on NVIDIA from RTX 30xx/A100 and on Macs with macOS 14+, "
                                       "else fp32); on CPUs bf16 where bf16 is native (AVX512-BF16, AMX), else fp32."),
            ],
            outputs=[VAE.Output(display_name="vae", tooltip="The VAE, for PixArt-Σ VAE Decode / Encode and Hires "
                                                            "Upscale.")],
        )

    @classmethod
    def execute(cls, vae_name: str, dtype: str) -> io.NodeOutput:
        path = paths.resolve(vae_name, VAE_FOLDERS)
        load_device, offload_device = devices.vae_devices()
        model, family = core_vae.load_vae(path, core_vae.compute_dtype(dtype, devices.auto_dtype("vae", load_device)))
        return io.NodeOutput(VAEHandle(loading.wrap(model, load_device, offload_device), vae_name, family))


class VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaVAEDecode",
            display_name="PixArt-Σ VAE Decode",
            category=f"{CATEGORY}/latent",
            description="Decodes a ComfyUI LATENT (raw VAE latents) to an IMAGE, checking for NaN; tiles when memory is short.",
            **search_aliases("pixart sigma vae decode", "vae decode", "latent to image"),
            inputs=[
                VAE.Input("vae", tooltip="The VAE from PixArt-Σ VAE Loader."),
                io.Latent.Input("samples", tooltip="Latents from PixArt-Σ Sampler (or any SDXL-VAE latent)."),
                io.Combo.Input("tiling", options=list(TILING), default="auto", optional=True,
                               tooltip="auto: decode in tiles when ComfyUI says the whole image would not fit in memory "
                                       "(e.g. 2K), or after an out-of-memory error."),
                io.Int.Input("target_width", default=0, min=0, max=16384, optional=True,
                             tooltip="Resize and centre-crop to this width after decoding (0 = keep); from PixArt-Σ Resolution."),
                io.Int.Input("target_height", default=0, min=0, max=16384, optional=True,
                             tooltip="Resize and centre-crop to this height after decoding (0 = keep)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The decoded images (resized to the target size "
                                                                  "when one is set).")],
        )

    @classmethod
    def execute(cls, vae: VAEHandle, samples, tiling: str = "auto", target_width: int = 0,
                target_height: int = 0) -> io.NodeOutput:
        latents = samples["samples"]
        core_vae.check_pairing(samples.get(LATENT_SPACE_KEY), vae.family, vae.name)
        target = optional_size(target_width, target_height, "PixArt VAE decode", "target_width and target_height")
        inner = vae.patcher.model.inner
        dtype, width = inner.dtype, inner.config.block_out_channels[0]
        need = core_vae.decode_memory(tuple(latents.shape), dtype, width)  # one image at a time
        ready, tiled = load_for(vae, need, tiling)
        progress.check_interrupt()
        on_image = progress.progress_callback(latents.shape[0])
        images = run_tiled(
            lambda t: core_vae.decode(ready.model, latents, tiled=t, target=target, on_image=on_image, device=ready.device),
            tiled, tiling, "decode", f"{latents.shape[-1] * 8}x{latents.shape[-2] * 8}")
        return io.NodeOutput(images)


class VAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaVAEEncode",
            display_name="PixArt-Σ VAE Encode",
            category=f"{CATEGORY}/latent",
            description="Encodes an IMAGE to a ComfyUI LATENT (raw VAE latents, posterior mean) for img2img.",
            **search_aliases("pixart sigma vae encode", "vae encode", "image to latent", "img2img"),
            inputs=[
                VAE.Input("vae", tooltip="The VAE from PixArt-Σ VAE Loader."),
                io.Image.Input("image", tooltip="The image to start from; its size should be a multiple of 16."),
                io.Combo.Input("tiling", options=list(TILING), default="auto", optional=True,
                               tooltip="auto: encode in tiles when ComfyUI says the whole image would not fit in memory, "
                                       "or after an out-of-memory error."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The image's latent, for the Sampler's latent "
                                                                    "(img2img; with Set Latent Noise Mask: "
                                                                    "inpainting).")],
        )

    @classmethod
    def execute(cls, vae: VAEHandle, image, tiling: str = "auto") -> io.NodeOutput:
        h, w = image.shape[1:3]
        check_multiple(w, h, f"PixArt VAE encode: the image is {w}x{h}", " Crop or resize it (e.g. with ImageScale).")
        inner = vae.patcher.model.inner
        need = core_vae.encode_memory(tuple(image.shape), inner.dtype, inner.config.block_out_channels[0]) * image.shape[0]
        ready, tiled = load_for(vae, need, tiling)
        samples = run_tiled(lambda t: core_vae.encode(ready.model, image, tiled=t, device=ready.device),
                            tiled, tiling, "encode", f"{w}x{h}")
        latent = {"samples": samples.to(devices.intermediate_device())}
        if vae.family:
            latent[LATENT_SPACE_KEY] = vae.family
        return io.NodeOutput(latent)

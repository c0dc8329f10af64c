"""VAE (diffusers AutoencoderKL): config from a state dict, loading from single files or folders, decoding."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import dtypes, files
from .meta import assign_state_dict, empty_weights
from .variants import VAE_SCALING
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

DTYPES = ("auto", "bf16", "fp32")


def compute_dtype(choice: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """Decode dtype (`auto`: what "auto" is on the load device): never fp16 (the SDXL VAE overflows in fp16)."""
    return dtypes.pick(choice, auto, "VAE", DTYPES, fp16_ok=False)


def family_from_name(name: str) -> str | None:
    """'sdxl' or 'sd' when the file name says which VAE it is."""
    low = name.lower()
    if "sdxl" in low or "sd_xl" in low or "sigma" in low:
        return "sdxl"
    if "ft-mse" in low or "ft-ema" in low or "sd15" in low or "sd-vae" in low or "alpha" in low:
        return "sd"
    return None


def family_from_config(config: dict[str, Any]) -> str | None:
    """'sdxl' or 'sd' from a diffusers VAE config's scaling factor."""
    scale = config.get("scaling_factor")
    return next((fam for fam, v in VAE_SCALING.items() if scale is not None and abs(scale - v) < 1e-6), None)


FAMILY_NAMES = {"sdxl": "the SDXL VAE (PixArt-Σ)", "sd": "the SD 1.x VAE (PixArt-α)"}


def check_pairing(latent_space: str | None, family: str | None, name: str, sampler: bool = False) -> None:
    """Refuse latents of one latent space where a model of the other family would use them (same shapes, wrong
    colours): VAE Decode with the other VAE (`family` the VAE's), or the sampler's img2img latent
    (sampler=True: `family` the latent space the DiT works in). Unknown spaces (None) pass."""
    if not latent_space or not family or latent_space == family:
        return
    if sampler:
        raise ValueError(
            f"PixArt sampler: the input latent was encoded with {FAMILY_NAMES[latent_space]}, but {name} works in "
            f"the {family.upper()} latent space. Encode with {FAMILY_NAMES[family]}.")
    raise ValueError(
        f"These latents are in the {latent_space.upper()} latent space, but {name} is "
        f"{FAMILY_NAMES[family]}. Load {FAMILY_NAMES[latent_space]}: sdxl_vae.safetensors for PixArt-Σ, "
        "vae-ft-mse-840000-ema-pruned.safetensors for PixArt-α."
    )


def config_from_state_dict(sd: dict[str, torch.Tensor], family: str | None) -> dict[str, Any]:
    """AutoencoderKL config implied by a diffusers-layout state dict."""
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
    channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n_blocks)]
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
    return diffusers_config(family, channels=tuple(channels), layers=layers,
                            in_channels=sd["encoder.conv_in.weight"].shape[1],
                            out_channels=sd["decoder.conv_out.weight"].shape[0],
                            latent_channels=sd["encoder.conv_out.weight"].shape[0] // 2)


def diffusers_config(family: str | None, *, channels: tuple[int, ...] = (128, 256, 512, 512), layers: int = 2,
                     sample_size: int | None = None, in_channels: int = 3, out_channels: int = 3,
                     latent_channels: int = 4) -> dict[str, Any]:
    """The AutoencoderKL config of the SDXL ('sdxl') or SD ('sd') VAE at a size (the defaults: the released one)."""
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": list(channels),
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": sample_size or (1024 if family == "sdxl" else 512),
        "scaling_factor": VAE_SCALING.get(family or "sdxl"),
        "force_upcast": True,
    }


def _ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (LDM) VAE keys -> diffusers keys, using diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    cfg = {"down_block_types": ["DownEncoderBlock2D"] * n_blocks, "up_block_types": ["UpDecoderBlock2D"] * n_blocks,
           "layers_per_block": len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})}
    return convert_ldm_vae_checkpoint(sd, cfg)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load an AutoencoderKL from a single file (LDM or diffusers keys) or a diffusers folder, on the CPU.

    Returns (AutoencoderKL, family): 'sdxl' or 'sd' as the folder's config or the file name says, None when
    neither does (the two VAEs have identical shapes).
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        wdir = files.component_folder(path, "vae", "diffusers VAE")
        files.check_folder(wdir)
        config = json.loads((wdir / "config.json").read_text())
        weights = next((wdir / f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (wdir / f).is_file()), None)
        if weights is None:
            raise files.WeightFileError(f"{wdir}: no diffusion_pytorch_model.safetensors in this folder.")
        sd = files.read_state_dict(weights, dtype)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        fam = family_from_config(config) or family_from_name(path.name)
    else:
        sd = files.read_state_dict(path, dtype)
        if any(".down.0.block." in k for k in sd) and any("decoder.up." in k for k in sd):
            sd = files.strip_prefix(sd, "encoder.conv_in.weight")
            sd = _ldm_to_diffusers(sd)
        sd = files.strip_prefix(sd, "encoder.conv_in.weight")
        if "encoder.conv_in.weight" not in sd or "encoder.down_blocks.0.resnets.0.conv1.weight" not in sd:
            raise files.WeightFileError(
                f"{path.name}: this is not a VAE; it looks like {files.describe(sd, files.shapes_of(sd))}. "
                "Choose sdxl_vae.safetensors (for PixArt-Σ) in models/vae."
            )
        fam = family_from_name(path.name)
        config = config_from_state_dict(sd, fam)
    with empty_weights():
        vae = AutoencoderKL.from_config(config)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    files.check_keys(path.name, sd, expected, "an AutoencoderKL VAE")
    files.check_shapes(path.name, files.shapes_of(sd), expected, "an AutoencoderKL VAE")
    assign_state_dict(vae, {k: v.to(dtype) for k, v in sd.items()})  # a no-op unless a converter made new tensors
    return vae.eval().requires_grad_(False), fam


def decode_memory(latent_shape: tuple[int, ...], dtype: torch.dtype, base_channels: int = 128) -> int:
    """Bytes an SD/SDXL VAE decode needs for these latents: ComfyUI's own estimate for this VAE (comfy/sd.py),
    scaled by the width of the decoder's full-resolution block (128 in the real VAEs), which dominates."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 2178 * latent_shape[2] * latent_shape[3] * 64 * size * base_channels // 128


def encode_memory(image_shape: tuple[int, ...], dtype: torch.dtype, base_channels: int = 128) -> int:
    """Bytes an SD/SDXL VAE encode of one [1,H,W,3] image needs: ComfyUI's own estimate for this VAE (comfy/sd.py,
    1767 bytes per pixel per dtype byte), scaled by the encoder's full-resolution width as decode_memory is."""
    size = torch.tensor([], dtype=dtype).element_size()
    return 1767 * image_shape[1] * image_shape[2] * size * base_channels // 128


@torch.no_grad()
def decode(
    vae: torch.nn.Module,
    latents: torch.Tensor,
    tiled: bool = False,
    target: tuple[int, int] | None = None,
    tile_latent: int = 64,
    on_image: Callable[[int, int], None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raw (unscaled) VAE latents [B,4,h,w] -> images [B,H,W,3] in 0..1 (float32, CPU), one image at a time
    (`on_image(done, total)` after each: progress and cancel between images), on `device` (default: the VAE's).

    `tiled` decodes overlapping tiles (diffusers' tiled_decode) to bound memory; `target` (width, height)
    resizes and centre-crops back to a requested size, as diffusers' resolution binning does.
    """
    p = next(vae.parameters())
    out = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1].to(device=device or p.device, dtype=p.dtype)
        images = _decode_one(vae, z, tiled, tile_latent)
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                "VAE decode produced NaN/inf values. The latents or the VAE overflowed: decode in fp32 "
                "(VAE dtype 'fp32'), and check that the VAE matches the model (SDXL VAE for PixArt-Σ)."
            )
        if target is not None:
            from .resolution import resize_and_crop

            images = resize_and_crop(images, *target)
        out.append((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        if on_image is not None:
            on_image(i + 1, latents.shape[0])
    return torch.cat(out)


@contextlib.contextmanager
def _tiles(vae: torch.nn.Module, tile_latent: int) -> Iterator[None]:
    """diffusers' tile sizes set to `tile_latent` latent pixels for the duration (restored after)."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_latent_min_size = tile_latent
    vae.tile_sample_min_size = tile_latent * 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        yield
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def _decode_one(vae: torch.nn.Module, z: torch.Tensor, tiled: bool, tile_latent: int) -> torch.Tensor:
    if not tiled:
        return vae.decode(z, return_dict=False)[0].float()
    with _tiles(vae, tile_latent):
        return vae.tiled_decode(z, return_dict=False)[0].float()


@torch.no_grad()
def encode(vae: torch.nn.Module, images: torch.Tensor, tiled: bool = False, tile_latent: int = 64,
           device: torch.device | None = None) -> torch.Tensor:
    """Images [B,H,W,3] in 0..1 -> raw (unscaled) latents [B,4,H/8,W/8]: the posterior mean (deterministic), on
    `device` (default: the VAE's). `tiled` encodes overlapping tiles (diffusers' tiled encoder) to bound memory."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    p = next(vae.parameters())
    x = (images.movedim(-1, 1) * 2 - 1).to(device=device or p.device, dtype=p.dtype)
    if not tiled:
        return vae.encode(x).latent_dist.mode().float().cpu()
    with _tiles(vae, tile_latent):
        return DiagonalGaussianDistribution(vae._tiled_encode(x)).mode().float().cpu()

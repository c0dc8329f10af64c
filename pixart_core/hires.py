"""Hires: a first result taken to a larger trained bin (img2img with the larger model), or past the largest bin
(refined in tiles of a trained size, pixart_core.tiles)."""
from __future__ import annotations

import torch

from . import resolution

UPSCALE_MODES = ("bicubic", "bilinear", "nearest-exact", "area")


def target_size(width: int, height: int, family: int, target_width: int = 0, target_height: int = 0) -> tuple[int, int]:
    """Where to upscale a width x height image: an explicit target (both sides, multiples of 16, any size, e.g.
    3840x2160 for a tiled refine), else the trained bin of `family` nearest its aspect ratio."""
    if (target_width > 0) != (target_height > 0):
        raise ValueError("PixArt upscale: set both width and height, or neither (0 = the family's bin).")
    if target_width > 0:
        for label, v in (("width", target_width), ("height", target_height)):
            if v % resolution.MULTIPLE:
                lo = max(resolution.MULTIPLE, v // resolution.MULTIPLE * resolution.MULTIPLE)
                raise ValueError(f"PixArt upscale: {label} {v} is not a multiple of {resolution.MULTIPLE} "
                                 f"(patch 2 x VAE 8); use {lo} or {lo + resolution.MULTIPLE}.")
        return target_width, target_height
    return resolution.snap(width, height, family)


def resize(x: torch.Tensor, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """[B,C,h,w] -> [B,C,height,width]: scaled to cover, then centre-cropped (the aspect ratio is kept, as
    diffusers' resolution binning does)."""
    if mode not in UPSCALE_MODES:
        raise ValueError(f"Unknown upscale mode {mode!r}; choose one of {UPSCALE_MODES}.")
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    ratio = max(height / h, width / w)
    rh, rw = max(height, round(h * ratio)), max(width, round(w * ratio))
    kwargs = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    x = torch.nn.functional.interpolate(x.float(), size=(rh, rw), mode=mode, **kwargs)
    top, left = (rh - height) // 2, (rw - width) // 2
    return x[..., top:top + height, left:left + width]


def upscale_images(images: torch.Tensor, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """IMAGE [B,H,W,3] in 0..1 -> [B,height,width,3] in 0..1."""
    return resize(images.movedim(-1, 1), width, height, mode).clamp(0, 1).movedim(1, -1)


def upscale_latents(latents: torch.Tensor, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """Raw latents [B,4,h,w] -> [B,4,height/8,width/8], interpolated in latent space."""
    return resize(latents, width // 8, height // 8, mode)


def tile_size(width: int, height: int, family: int) -> tuple[int, int]:
    """The tile for a width x height canvas: the trained bin of `family` nearest the canvas's aspect ratio, no larger
    than the canvas (a canvas smaller than the bin is one tile along that side)."""
    tw, th = resolution.snap(width, height, family)
    return min(tw, width), min(th, height)

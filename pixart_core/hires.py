"""Hires: a first result taken to a larger trained bin (img2img with the larger model), or past the largest bin
(refined in tiles of a trained size, pixart_core.tiles)."""
from __future__ import annotations

import torch

from . import resolution, tiles

UPSCALE_MODES = ("bicubic", "bilinear", "nearest-exact", "area")


def target_size(width: int, height: int, family: int, target_width: int = 0, target_height: int = 0) -> tuple[int, int]:
    """Where to upscale a width x height image: an explicit target (both sides, multiples of 16, any size, e.g.
    3840x2160 for a tiled refine), else the trained bin of `family` nearest its aspect ratio."""
    target = resolution.optional_size(target_width, target_height, "PixArt upscale", "width and height",
                                      "0 = the family's bin")
    if target is None:
        return resolution.snap(width, height, family)
    resolution.check_multiple(*target, "PixArt upscale")
    return target


def _resize(x: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    if mode not in UPSCALE_MODES:
        raise ValueError(f"Unknown upscale mode {mode!r}; choose one of {UPSCALE_MODES}.")
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return resolution.resize_and_crop(x.float(), width, height, mode, covering=True)


def upscale_images(images: torch.Tensor, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """IMAGE [B,H,W,3] in 0..1 -> [B,height,width,3] in 0..1 (scaled to cover, then centre-cropped)."""
    return _resize(images.movedim(-1, 1), width, height, mode).clamp(0, 1).movedim(1, -1)


def upscale_latents(latents: torch.Tensor, width: int, height: int, mode: str = "bicubic") -> torch.Tensor:
    """Raw latents [B,4,h,w] -> [B,4,height/8,width/8], interpolated in latent space (scaled to cover, cropped)."""
    return _resize(latents, width // 8, height // 8, mode)


def tile_size(width: int, height: int, family: int) -> tuple[int, int]:
    """The tile for a width x height canvas: the trained bin of `family` nearest the canvas's aspect ratio, no larger
    than the canvas (a canvas smaller than the bin is one tile along that side)."""
    tw, th = resolution.snap(width, height, family)
    return min(tw, width), min(th, height)


def tiling(width: int, height: int, family: int, tile_width: int, tile_height: int,
           overlap: int) -> tuple[list[tiles.Tile], tuple[int, int]]:
    """The tiles (latent pixels) a width x height canvas is refined in, and their size in pixels: tile_width x
    tile_height (0 x 0: the bin of `family` nearest the canvas's aspect ratio), overlapping by at least `overlap`."""
    tile = resolution.optional_size(tile_width, tile_height, "PixArt tiled refine", "tile_width and tile_height",
                                    "0 = the DiT's bin")
    if tile is not None:
        resolution.check_size(*tile)
        tw, th = min(tile[0], width), min(tile[1], height)
    else:
        tw, th = tile_size(width, height, family)
    if overlap % 8 or (width > tw and overlap >= tw) or (height > th and overlap >= th):
        raise ValueError(f"PixArt tiled refine: overlap {overlap} px must be a multiple of 8 and smaller than the "
                         f"tile ({tw}x{th}); lower it.")
    return tiles.layout(height // 8, width // 8, th // 8, tw // 8, overlap // 8), (tw, th)

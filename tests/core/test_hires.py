"""pixart_core.hires on its own: where an upscale goes (diffusers' bins, or an explicit size), the upscale itself
(torch's interpolate on the covering size, centre-cropped, by hand), the tiled refine's layout and every refusal's
whole message. The nodes around it are in tests/nodes/test_hires_nodes.py; the tiles in test_tiled_sampling.py."""
from __future__ import annotations

import math

import pytest
import torch

from pixart_core import hires


def test_without_a_target_the_upscale_goes_to_diffusers_bin():
    """target_width/height left out: the bin diffusers' PixArtImageProcessor.classify_height_width_bin picks from
    ASPECT_RATIO_1024_BIN for the image's aspect ratio."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

    bin_h, bin_w = PixArtImageProcessor.classify_height_width_bin(600, 1000, ratios=ASPECT_RATIO_1024_BIN)
    assert hires.target_size(1000, 600, 1024) == (bin_w, bin_h)


@pytest.mark.parametrize("target,message", [
    ((1024, 0), "PixArt upscale: set both width and height, or neither (0 = the family's bin)."),
    ((1000, 1024), "PixArt upscale: width 1000 is not a multiple of 16 (patch 2 x VAE 8); use 992 or 1008."),
])
def test_a_target_half_set_or_off_the_grid_is_refused_whole(target, message):
    with pytest.raises(ValueError) as e:
        hires.target_size(1000, 600, 1024, *target)
    assert str(e.value) == message


def test_the_default_upscale_is_bicubic_on_images_and_latents():
    """A 2x upscale of the same aspect ratio (no crop), by hand: torch's bicubic interpolate with align_corners
    False; images clamped to 0..1 and moved channels-last again."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 4, 6, 3, generator=g)
    want = torch.nn.functional.interpolate(images.movedim(-1, 1), size=(8, 12), mode="bicubic", align_corners=False)
    assert torch.equal(hires.upscale_images(images, 12, 8), want.clamp(0, 1).movedim(1, -1))
    latents = torch.randn(1, 4, 4, 6, generator=g)
    want = torch.nn.functional.interpolate(latents, size=(8, 12), mode="bicubic", align_corners=False)
    assert torch.equal(hires.upscale_latents(latents, 96, 64), want)


def test_an_upscale_to_another_aspect_covers_then_crops_the_centre():
    """A 3 x 5 latent to 16 x 16: the ratio is max(16/3, 16/5) = 16/3, so the covering size is 16 x round(26.67) =
    16 x 27 (never below the target), cut to columns 5..20 (27 - 16 = 11, half of it 5). The truncating rule of the
    resize-back after decoding (int(26.67) = 26, columns 5..20 of 26) gives other pixels."""
    latents = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.interpolate(latents, size=(16, 27), mode="bilinear", align_corners=False)[..., 5:21]
    assert torch.equal(hires.upscale_latents(latents, 128, 128, "bilinear"), want)


def test_a_latent_already_at_the_size_comes_back_as_it_is():
    latents = torch.randn(1, 4, 8, 12).to(torch.bfloat16)
    assert hires.upscale_latents(latents, 96, 64) is latents


def test_an_unknown_upscale_mode_is_refused_naming_the_modes():
    with pytest.raises(ValueError) as e:
        hires.upscale_images(torch.rand(1, 8, 8, 3), 16, 16, "lanczos")
    assert str(e.value) == ("Unknown upscale mode 'lanczos'; choose one of "
                            "('bicubic', 'bilinear', 'nearest-exact', 'area').")


def test_an_overlap_of_one_latent_pixel_counts():
    """128 x 64 px in 64 px tiles overlapping by 8 px (one latent pixel): ceil((16 - 1) / (8 - 1)) = 3 tiles across,
    at round(0, 4, 8) latent pixels."""
    layout, size = hires.tiling(128, 64, 1024, 64, 64, 8)
    assert size == (64, 64)
    assert [(t.y, t.x) for t in layout] == [(0, 0), (0, 4), (0, 8)]
    assert len(layout) == math.ceil((16 - 1) / (8 - 1))


@pytest.mark.parametrize("width,height,overlap", [
    (256, 256, 12),  # not a multiple of 8, though it fits
    (256, 64, 64),  # as wide as the tile, along the side that has several tiles
    (64, 256, 64),  # as tall as the tile
    (256, 64, 72),
])
def test_an_overlap_off_the_latent_grid_or_not_inside_the_tile_is_refused(width, height, overlap):
    with pytest.raises(ValueError) as e:
        hires.tiling(width, height, 1024, 64, 64, overlap)
    assert str(e.value) == (f"PixArt tiled refine: overlap {overlap} px must be a multiple of 8 and smaller than the "
                            "tile (64x64); lower it.")


def test_a_tile_half_set_is_refused_whole():
    with pytest.raises(ValueError) as e:
        hires.tiling(256, 256, 1024, 64, 0, 8)
    assert str(e.value) == "PixArt tiled refine: set both tile_width and tile_height, or neither (0 = the DiT's bin)."

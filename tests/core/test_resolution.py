"""Resolution: the aspect-ratio bins and snapping against diffusers' PixArtImageProcessor, its binning resize, and the
size rule the DiT needs (by hand)."""
from __future__ import annotations

import pytest
import torch

from pixart_core import resolution

SIZES = [(1024, 1024), (1000, 1000), (1920, 1080), (1080, 1920), (512, 2048), (3000, 200), (200, 3000), (64, 64),
         (777, 555), (1216, 832)]


@pytest.mark.parametrize("family", [256, 512, 1024, 2048])
def test_snap_is_diffusers_classify_height_width_bin(family):
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    table = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
             2048: ASPECT_RATIO_2048_BIN}[family]
    assert resolution.bins(family) == table
    for width, height in SIZES:
        h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
        assert resolution.snap(width, height, family) == (w, h), (width, height)


def test_unknown_family_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match=r"No aspect-ratio bins for a 768px family; choose one of \(256, 512, 1024, 2048\)"):
        resolution.bins(768)
    for w, h in [(0, 64), (64, 0), (-16, 64)]:
        with pytest.raises(ValueError, match=f"Requested size {w}x{h} must be positive"):
            resolution.snap(w, h, 1024)


@pytest.mark.parametrize("src,dst", [((64, 96), (60, 80)), ((96, 64), (80, 60)), ((64, 64), (40, 56)),
                                     ((48, 80), (48, 80)), ((128, 64), (100, 30))])
def test_resize_and_crop_is_diffusers_binning_resize(src, dst):
    from diffusers.image_processor import PixArtImageProcessor

    torch.manual_seed(0)
    images = torch.rand(2, 3, *src)
    want = PixArtImageProcessor.resize_and_crop_tensor(images, dst[1], dst[0])
    got = resolution.resize_and_crop(images, dst[1], dst[0])
    assert got.shape == want.shape == (2, 3, *dst)
    assert torch.allclose(got, want, atol=1e-6)


def test_snap_takes_any_positive_size():
    assert resolution.snap(1, 1, 1024) == (1024, 1024)
    assert resolution.snap(1, 3, 256) == resolution.snap(16, 48, 256)


def test_check_size_refuses_exactly_what_the_dit_cannot_take():
    """The size rule by hand: sides are multiples of 16 (patch 2 x VAE 8) from 16 to 4096 (the largest side of any
    trained bin, the 2K family's 4096 x 1024), and the message names the two neighbouring multiples."""
    from pixart_core.resolution import check_size

    for w, h in ((16, 16), (4096, 4096), (1024, 1008)):
        check_size(w, h)
    cases = [
        ((0, 64), "PixArt sampler: width 0 is outside 16..4096."),
        ((64, 4112), "PixArt sampler: height 4112 is outside 16..4096."),
        ((1000, 64), "PixArt sampler: width 1000 is not a multiple of 16 (patch 2 x VAE 8); use 992 or 1008."),
        ((64, 8), "PixArt sampler: height 8 is not a multiple of 16 (patch 2 x VAE 8); use 16 or 16."),
        ((1, 64), "PixArt sampler: width 1 is not a multiple of 16 (patch 2 x VAE 8); use 16 or 16."),
        ((64, 50), "PixArt sampler: height 50 is not a multiple of 16 (patch 2 x VAE 8); use 48 or 64."),
    ]
    for (w, h), message in cases:
        with pytest.raises(ValueError) as e:
            check_size(w, h)
        assert str(e.value) == message

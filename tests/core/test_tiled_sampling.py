"""Sampling by tiles (hires and 4K): MultiDiffusion tile weights by hand, the tiled DiT against untiled sampling and
against a hand-built blend of crops, determinism, one tile's activations per forward, micro-conditioning per tile.
The nodes around it are in tests/nodes/test_hires_nodes.py."""
from __future__ import annotations

import pytest
import torch

from harness import models as tiny

T5 = tiny.T5_WIDTH


def _cond(seed: int, length: int = 5):
    from pixart_core.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, length, T5, generator=g), torch.ones(1, length, dtype=torch.long))


# --- the tile weights ----------------------------------------------------------------------------------------------

def test_tile_weights_by_hand_in_one_dimension():
    """10 latent pixels, tiles of 6 overlapping by 2: tiles at 0 and 4; linear ramps over the 2 shared pixels with
    weights (p + 0.5) / 2 (hand-computed: 0.25, 0.75 and mirrored), 1 elsewhere and up to the canvas edges."""
    from pixart_core import tiles

    layout = tiles.layout(1, 10, 1, 6, 2)
    assert [(t.y, t.x, t.h, t.w) for t in layout] == [(0, 0, 1, 6), (0, 4, 1, 6)]
    assert layout[0].weight.flatten().tolist() == [1, 1, 1, 1, 0.75, 0.25]
    assert layout[1].weight.flatten().tolist() == [0.25, 0.75, 1, 1, 1, 1]


def test_three_tiles_over_one_pixel_are_normalised_by_hand():
    """11 pixels, tiles of 6, overlap >= 2: n = ceil((11-2)/(6-2)) = 3 tiles at round(0, 2.5, 5) = 0, 2, 5. Pixel 5
    lies in all three. Raw ramps there (by hand): tile 0 (right overlap 4) (6-5-0.5)/4 = 0.125, tile 1 (left 4,
    right 3) min((3.5)/4, (2.5)/3) = 5/6, tile 2 (left 3) 0.5/3 = 1/6; sum 9/8, so normalised 1/9, 20/27, 4/27."""
    from pixart_core import tiles

    layout = tiles.layout(1, 11, 1, 6, 2)
    assert [t.x for t in layout] == [0, 2, 5]
    at5 = [t.weight[0, 5 - t.x].item() for t in layout]
    assert at5 == pytest.approx([1 / 9, 20 / 27, 4 / 27], abs=1e-6)


@pytest.mark.parametrize("canvas,tile,overlap", [((37, 53), (16, 24), 6), ((11, 9), (6, 4), 2), ((20, 20), (8, 8), 0),
                                                 ((8, 30), (16, 10), 3)])
def test_tile_weights_sum_to_one_everywhere(canvas, tile, overlap):
    """Odd-sized canvases, overlaps, edges, a tile taller than the canvas: every latent pixel's weights add to 1,
    every tile lies inside the canvas at its size (clamped to the canvas), and neighbours overlap by >= overlap."""
    from pixart_core import tiles

    (h, w), (th, tw) = canvas, tile
    layout = tiles.layout(h, w, th, tw, overlap)
    total = torch.zeros(h, w, dtype=torch.float64)
    for t in layout:
        assert (t.h, t.w) == (min(th, h), min(tw, w)) and t.weight.shape == (t.h, t.w)
        assert 0 <= t.y <= h - t.h and 0 <= t.x <= w - t.w and bool((t.weight > 0).all())
        total[t.y:t.y + t.h, t.x:t.x + t.w] += t.weight.double()
    assert (total - 1).abs().max() <= 1e-6
    xs = sorted({t.x for t in layout})
    assert all(a + min(tw, w) - b >= overlap for a, b in zip(xs, xs[1:]))


def test_overlap_not_smaller_than_the_tile_is_refused():
    from pixart_core import tiles

    with pytest.raises(ValueError, match="overlap 8 must be at least 0 and smaller than the tile"):
        tiles.layout(16, 32, 8, 8, 8)


# --- the tiled DiT ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit():
    return tiny.make_dit()


def _sample(model, seed=3, size=(64, 96), steps=3, init=None, denoise=1.0):
    from pixart_core import sampling

    noise, gen = sampling.initial_noise(seed, 1, 4, *size)
    return sampling.sample(model, _cond(1), _cond(2, 3), noise, steps=steps, cfg=4.5, generator=gen,
                           init_latents=init, denoise=denoise)


@pytest.mark.parametrize("tile", [(8, 12), (16, 16)])  # exactly the canvas; larger than it (clamped)
def test_one_tile_covering_the_image_equals_untiled_sampling(dit, tile):
    from pixart_core import tiles

    layout = tiles.layout(8, 12, *tile, 2)
    assert len(layout) == 1
    untiled = _sample(dit)
    tiled = _sample(tiles.TiledDiT(dit, layout, (8, 12)))
    assert torch.equal(tiled, untiled)


def test_tiled_dit_looks_like_the_dit_to_the_loop(dit):
    from pixart_core import tiles

    model = tiles.TiledDiT(dit, tiles.layout(8, 8, 8, 8, 0), (8, 8))
    assert model.config is dit.config and next(model.parameters()) is next(dit.parameters())
    assert model.transformer_blocks is dit.transformer_blocks and model.use_additional_conditions is False
    with pytest.raises(AttributeError):
        model.no_such_attribute
    with pytest.raises(ValueError, match=r"laid out for a \(8, 8\) latent got \(8, 10\)"):
        model(torch.zeros(2, 4, 8, 10), encoder_hidden_states=torch.zeros(2, 3, T5), timestep=torch.tensor([1, 1]))


def test_tiled_forward_is_the_hand_weighted_blend_of_the_dit_on_each_crop(dit):
    """MultiDiffusion's closed form (Bar-Tal et al. 2023, eq. 5) on an 8x12 latent in two 8x8 tiles overlapping by
    4: the DiT run on each crop by hand, blended with the linear ramp 0.125, 0.375, 0.625, 0.875 (and mirrored)."""
    from pixart_core import tiles

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    c = _cond(4)
    kw = dict(encoder_hidden_states=c.embeds.repeat(2, 1, 1), timestep=torch.tensor([500, 500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    model = tiles.TiledDiT(dit, tiles.layout(8, 12, 8, 8, 4), (8, 12))
    with torch.no_grad():
        got = model(x, **kw)[0]
        left, right = dit(x[..., :8], **kw)[0], dit(x[..., 4:], **kw)[0]
    ramp = torch.tensor([0.125, 0.375, 0.625, 0.875])
    w_left = torch.cat([torch.ones(4), ramp.flip(0)])
    w_right = torch.cat([ramp, torch.ones(4)])
    want = torch.zeros(2, 8, 8, 12)
    want[..., :8] += left * w_left
    want[..., 4:] += right * w_right
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_tiled_sampling_is_deterministic_per_seed(dit):
    from pixart_core import tiles

    latent = torch.randn(1, 4, 16, 20, generator=torch.Generator().manual_seed(9))
    model = tiles.TiledDiT(dit, tiles.layout(16, 20, 8, 8, 2), (16, 20))
    a = _sample(model, seed=5, size=(128, 160), init=latent, denoise=0.6)
    b = _sample(model, seed=5, size=(128, 160), init=latent, denoise=0.6)
    c = _sample(model, seed=6, size=(128, 160), init=latent, denoise=0.6)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_the_dit_sees_one_tile_per_forward_however_large_the_canvas(dit):
    """Memory bound: a forward pre-hook on the DiT records the batch x latent size it is given; on a 3x larger
    canvas it is still one 8x8 tile with the CFG batch of 2, called tiles x steps times."""
    from pixart_core import tiles

    seen = []
    handle = dit.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        for canvas in ((8, 8), (24, 24)):
            seen.clear()
            layout = tiles.layout(*canvas, 8, 8, 2)
            _sample(tiles.TiledDiT(dit, layout, canvas), size=(canvas[0] * 8, canvas[1] * 8), steps=2)
            assert set(seen) == {(2, 4, 8, 8)} and len(seen) == 2 * len(layout)
    finally:
        handle.remove()
    assert len(layout) == 16  # ceil((24 - 2) / (8 - 2)) = 4 per side


def test_micro_conditioning_gets_each_tiles_size():
    """PixArt-α 1024-MS reads the image size and aspect ratio: each tile's, not the canvas's."""
    from pixart_core import tiles

    alpha = tiny.make_dit(variant="alpha-1024")
    assert alpha.use_additional_conditions
    seen = []
    handle = alpha.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["resolution"][0].tolist()), with_kwargs=True)
    try:
        _sample(tiles.TiledDiT(alpha, tiles.layout(8, 16, 8, 10, 2), (8, 16)), size=(64, 128), steps=1)
    finally:
        handle.remove()
    assert seen == [[64.0, 80.0]] * 2


def test_tile_callback_runs_after_every_tile(dit):
    from pixart_core import tiles

    calls = []
    layout = tiles.layout(8, 16, 8, 8, 2)
    _sample(tiles.TiledDiT(dit, layout, (8, 16), on_tile=lambda i, n: calls.append((i, n))), size=(64, 128), steps=2)
    assert calls == [(1, 3), (2, 3), (3, 3)] * 2


# --- the default tile ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,width,height", [(2048, 3840, 2160), (2048, 2160, 3840), (2048, 4096, 4096),
                                                 (2048, 1536, 1024), (1024, 3840, 2160), (1024, 800, 3000),
                                                 (512, 1920, 1088), (256, 640, 384)])
def test_default_tile_is_diffusers_bin_for_the_canvas(family, width, height):
    """tile_width/height 0: the bin diffusers' PixArtImageProcessor.classify_height_width_bin picks for the canvas
    from the DiT family's ASPECT_RATIO_*_BIN (pipeline_pixart_alpha / pipeline_pixart_sigma), no larger than the
    canvas (a canvas smaller than the bin is one tile along that side); every tile of the layout has that size."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    from pixart_core import hires

    table = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
             2048: ASPECT_RATIO_2048_BIN}
    bin_h, bin_w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table[family])
    want = (min(bin_w, width), min(bin_h, height))
    layout, size = hires.tiling(width, height, family, 0, 0, 64)
    assert size == want
    assert {(t.h, t.w) for t in layout} == {(want[1] // 8, want[0] // 8)}


def test_the_4k_guide_tile_counts():
    """docs/4k.md: with the 2K DiT and the default overlap (256 px), 3840x2160 is refined in four 2688x1536 tiles and
    4096x4096 in nine 2048x2048 tiles. By hand: 3840 px = 480 latent px in tiles of 336 overlapping >= 32:
    ceil((480 - 32) / (336 - 32)) = 2 per row; 2160 -> 270 in 192: ceil(238 / 160) = 2; 4096 -> 512 in 256:
    ceil(480 / 224) = 3 per side."""
    from pixart_core import hires

    for (width, height), (count, tile) in (((3840, 2160), (4, (2688, 1536))), ((4096, 4096), (9, (2048, 2048)))):
        layout, size = hires.tiling(width, height, 2048, 0, 0, 256)
        assert (len(layout), size) == (count, tile)


def test_a_tiled_canvas_may_be_larger_than_any_trained_bin(dit):
    """The 4096 px limit is the DiT's (the 2K family's largest bin); tiles are checked where they were laid out, so a
    tiled canvas 4160 px wide samples, while the same request to the plain DiT is refused before anything runs."""
    from pixart_core import tiles

    canvas = (8, 520)  # 64 x 4160 px: one side over 4096
    model = tiles.TiledDiT(dit, tiles.layout(*canvas, 8, 130, 0), canvas)
    out = _sample(model, size=(64, 4160), steps=1)
    assert out.shape == (1, 4, 8, 520) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="width 4160 is outside"):
        _sample(dit, size=(64, 4160), steps=1)


def _hand_weights(length: int, starts: list[int], tile: int) -> list[list[float]]:
    """The normalised 1-D weights of tiles at `starts`, in Python floats (float64): each tile's ramp is
    min(1, (p + 0.5) / left, (tile - p - 0.5) / right) over the overlaps `left`/`right` it shares with its
    neighbours, then every pixel's weights are divided by their sum."""
    raw = []
    for i, a in enumerate(starts):
        left = starts[i - 1] + tile - a if i > 0 else 0
        right = a + tile - starts[i + 1] if i + 1 < len(starts) else 0
        raw.append([min([1.0] + ([(p + 0.5) / left] if left else []) + ([(tile - p - 0.5) / right] if right else []))
                    for p in range(tile)])
    total = [0.0] * length
    for a, w in zip(starts, raw):
        for p, v in enumerate(w):
            total[a + p] += v
    return [[v / total[a + p] for p, v in enumerate(w)] for a, w in zip(starts, raw)]


@pytest.mark.parametrize("length,tile,overlap,starts", [
    (15, 8, 1, [0, 7]),  # an overlap of one latent pixel: 0.5 each side of the seam
    (11, 6, 2, [0, 2, 5]),  # three tiles over one pixel
    (53, 24, 6, [0, 14, 29]),  # ceil((53 - 6) / 18) = 3 at round(0, 14.5, 29), halves to even
    (37, 16, 6, [0, 7, 14, 21]),  # ceil(31 / 10) = 4 at round(0, 7, 14, 21)
])
def test_tile_weights_are_the_hand_computed_ones_rounded_once(length, tile, overlap, starts):
    """Every weight, exactly: the ramps and their sums in float64 (as the hand computation does), rounded to float32
    once at the end, so seams add to 1 as closely as float32 allows."""
    from pixart_core import tiles

    layout = tiles.layout(1, length, 1, tile, overlap)
    assert [t.x for t in layout] == starts
    for t, want in zip(layout, _hand_weights(length, starts, tile)):
        assert t.weight.dtype == torch.float32
        assert torch.equal(t.weight, torch.tensor([want], dtype=torch.float64).float())


@pytest.mark.parametrize("label,args", [("height", (0, 8, 8, 8)), ("width", (8, 0, 8, 8)),
                                        ("tile height", (8, 8, 0, 8)), ("tile width", (8, 8, 8, -8))])
def test_a_size_that_is_not_positive_is_refused_by_name(label, args):
    from pixart_core import tiles

    with pytest.raises(ValueError) as e:
        tiles.layout(*args, 0)
    assert str(e.value) == f"Tiled sampling: {label} {min(args)} must be positive."


def test_micro_conditioning_of_each_tile_covers_the_whole_batch():
    """Two images with CFG: the DiT gets four rows, each with the tile's size and aspect ratio (64 x 80 px: 0.8)."""
    from pixart_core import sampling, tiles

    alpha = tiny.make_dit(variant="alpha-1024")
    seen = []
    handle = alpha.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]),
                                             with_kwargs=True)
    noise, gen = sampling.initial_noise(3, 2, 4, 64, 128)
    try:
        sampling.sample(tiles.TiledDiT(alpha, tiles.layout(8, 16, 8, 10, 2), (8, 16)), _cond(1), _cond(2, 3), noise,
                        steps=1, cfg=4.5, generator=gen)
    finally:
        handle.remove()
    assert len(seen) == 2
    for added in seen:
        assert added["resolution"].tolist() == [[64.0, 80.0]] * 4
        assert torch.equal(added["aspect_ratio"], torch.full((4, 1), 64 / 80, dtype=added["resolution"].dtype))


def _forward_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g).to(dtype)
    kw = dict(encoder_hidden_states=_cond(4).embeds.repeat(2, 1, 1).to(dtype), timestep=torch.tensor([500, 500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    return x, kw


def test_a_bf16_dit_blends_its_tiles_in_fp32():
    """The blend is accumulated in fp32 (a bf16 sum of weighted tiles would round at every seam): the output is the
    hand blend of the DiT's bf16 predictions, each cast to fp32 and weighted, in fp32."""
    from pixart_core import tiles

    dit = tiny.make_dit().to(torch.bfloat16)
    x, kw = _forward_inputs(torch.bfloat16)
    layout = tiles.layout(8, 12, 8, 8, 4)
    with torch.no_grad():
        got = tiles.TiledDiT(dit, layout, (8, 12))(x, **kw)[0]
        want = torch.zeros(2, 8, 8, 12)
        for t in layout:
            want[..., t.x:t.x + t.w] += dit(x[..., t.x:t.x + t.w], **kw)[0].float() * t.weight
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_one_tile_is_the_dits_own_forward_dtype_included():
    from pixart_core import tiles

    dit = tiny.make_dit().to(torch.bfloat16)
    x, kw = _forward_inputs(torch.bfloat16)
    with torch.no_grad():
        got = tiles.TiledDiT(dit, tiles.layout(8, 12, 8, 12, 2), (8, 12))(x, **kw)[0]
        want = dit(x, **kw)[0]
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_progress_per_tile_with_a_controlnet_applied(dit):
    """A ControlNet makes the guided prediction ask for the DiT's form at each step (TiledDiT.at_step): that form
    still reports each tile."""
    from pixart_core import controlnet, tiles

    calls = []
    layout = tiles.layout(8, 16, 8, 8, 2)
    model = tiles.TiledDiT(controlnet.ControlledDiT(dit, ()), layout, (8, 16), on_tile=lambda i, n: calls.append(i))
    _sample(model, size=(64, 128), steps=2)
    assert calls == [1, 2, 3] * 2


def test_the_tile_weights_follow_the_dit_to_its_device():
    """The layout's weights live on the CPU; the blend moves each to the device the DiT predicts on. A DiT on the
    meta device stands for a GPU (a CPU weight times a meta prediction is refused as a CPU one times a CUDA one is)."""
    from pixart_core import tiles

    dit = tiny.make_dit().to("meta")
    x, kw = _forward_inputs(torch.float32)
    kw.update(encoder_hidden_states=kw["encoder_hidden_states"].to("meta"), timestep=kw["timestep"].to("meta"))
    layout = tiles.layout(8, 12, 8, 8, 4)
    assert {t.weight.device.type for t in layout} == {"cpu"}
    out = tiles.TiledDiT(dit, layout, (8, 12))(x.to("meta"), **kw)[0]
    assert out.device.type == "meta" and out.shape == (2, 8, 8, 12) and out.dtype == torch.float32


def test_the_tiled_forward_takes_the_dits_positional_arguments(dit):
    """Same signature as the DiT's: the text embeddings may come second, by position."""
    from pixart_core import tiles

    x, kw = _forward_inputs(torch.float32)
    model = tiles.TiledDiT(dit, tiles.layout(8, 12, 8, 8, 4), (8, 12))
    with torch.no_grad():
        by_name = model(x, **kw)[0]
        by_position = model(x, kw.pop("encoder_hidden_states"), **kw)[0]
    assert torch.equal(by_position, by_name)

"""Issue 16, hires and 4K by tiles: MultiDiffusion tile weights, the tiled DiT against untiled sampling and against
a hand-built blend of crops, determinism, one tile's activations per forward, and the nodes in ComfyUI's executor
(bins from diffusers' table, the VAE upscale path against diffusers' VAE, progress/cancel per tile, ComfyUI's
memory request)."""
from __future__ import annotations

import pytest
import torch

from harness import models as tiny
from test_nodes import graph

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


# --- the nodes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(1024, 1024), (1344, 768), (768, 1344), (1216, 832)])
def test_hires_upscale_goes_to_diffusers_2k_bin(comfy, w, h):
    """The bin is diffusers' classify_height_width_bin over its ASPECT_RATIO_2048_BIN (pipeline_pixart_sigma)."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    latent = {"samples": torch.randn(1, 4, h // 8, w // 8), "pixart_latent_space": "sdxl"}
    out, bw, bh = node.execute(samples=latent, family="2048", method="latent", upscale_mode="bicubic", width=0,
                               height=0).result
    want_h, want_w = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=ASPECT_RATIO_2048_BIN)
    assert (bw, bh) == (want_w, want_h)
    assert out["samples"].shape == (1, 4, want_h // 8, want_w // 8) and out["pixart_latent_space"] == "sdxl"


def test_hires_upscale_through_the_vae_is_decode_resize_encode(comfy, tiny_models):
    """method 'vae' = diffusers' AutoencoderKL decode, torch bicubic resize (scale to cover, centre crop), encode
    (posterior mean), written out here with diffusers' and torch's calls."""
    from test_gpu_readiness import pack

    loading, devices, VAEHandle = pack("nodes.comfy.loading"), pack("nodes.comfy.devices"), pack("nodes.types").VAEHandle
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    vae = tiny_models["vae"]
    handle = VAEHandle(loading.wrap(tiny.make_vae(), *devices.vae_devices()), "tiny_sdxl_vae", "sdxl")
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    out, w, h = node.execute(samples={"samples": z}, family="2048", method="vae (decode, upscale, encode)",
                             upscale_mode="bicubic", width=96, height=96, vae=handle).result
    assert (w, h) == (96, 96)
    with torch.no_grad():
        img = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)  # [1,3,64,48]
        img = torch.nn.functional.interpolate(img, size=(128, 96), mode="bicubic", align_corners=False)[:, :, 16:112]
        want = vae.encode(img.clamp(0, 1) * 2 - 1).latent_dist.mode()
    assert out["samples"].shape == (1, 4, 12, 12)
    assert (out["samples"] - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert out["pixart_latent_space"] == "sdxl"


def test_hires_upscale_without_a_vae_says_what_to_do(executor):
    p = graph(steps=1)
    p["9"] = {"class_type": "PixArtSigmaHiresUpscale",
              "inputs": {"samples": ["4", 0], "family": "2048", "method": "vae (decode, upscale, encode)",
                         "upscale_mode": "bicubic", "width": 128, "height": 128}}
    p["6"]["inputs"]["samples"] = ["9", 0]
    result = executor.run(p)
    assert not result["ok"]
    assert "connect PixArt-Σ VAE Loader or choose method 'latent'" in result["error"]["exception_message"]


def tiled_graph(seed=3, steps=4, denoise=0.5, canvas=128, tile=64, overlap=32, prefix="tiled"):
    """64 px text-to-image -> Hires Upscale (VAE) to canvas -> Tiled Refine in tile x tile tiles -> decode -> save."""
    p = graph(steps=2, seed=seed, prefix=prefix)
    p["9"] = {"class_type": "PixArtSigmaHiresUpscale",
              "inputs": {"samples": ["4", 0], "family": "2048", "method": "vae (decode, upscale, encode)",
                         "upscale_mode": "bicubic", "width": canvas, "height": canvas, "vae": ["5", 0]}}
    p["10"] = {"class_type": "PixArtSigmaTiledRefine",
               "inputs": {"dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["9", 0],
                          "seed": seed, "steps": steps, "cfg": 4.5, "scheduler": "dpm++ 2m", "denoise": denoise,
                          "tile_width": tile, "tile_height": tile, "overlap": overlap}}
    p["6"]["inputs"].update(samples=["10", 0], tiling="always")
    return p


def test_tiled_refine_reports_progress_per_tile_and_cancels_mid_step(executor, comfy, comfy_base):
    """128 px canvas, 64 px tiles overlapping by >= 32 px: 3 x 3 = 9 tiles; denoise 0.5 of 4 steps runs 2 steps: the
    node's bar counts 18 tile forwards. An interrupt after the 3rd tile (inside the first step) stops the run there;
    the next run works."""
    import comfy.model_management as mm
    import comfy.utils

    from test_nodes import _saved_images

    calls = []

    def record(value, total, preview, node_id=None):
        if total == 18:  # the tiled node's bar (the in-process executor passes no node id)
            calls.append((value, total))

    comfy.utils.set_progress_bar_global_hook(record)
    try:
        result = executor.run(tiled_graph())
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert result["ok"], result["error"]
    assert sorted(set(calls)) == [(v, 18) for v in range(1, 19)]
    assert [v for v, _ in calls] == sorted(v for v, _ in calls)
    assert _saved_images(result, comfy_base)[0].shape == (128, 128, 3)

    calls.clear()

    def interrupt(value, total, preview, node_id=None):
        record(value, total, preview, node_id)
        if total == 18 and value == 3:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt)
    try:
        result = executor.run(tiled_graph(seed=4))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not result["ok"]
    interrupted = [d for e, d in result["messages"] if e == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "PixArtSigmaTiledRefine"
    assert max(v for v, _ in calls) == 3
    after = executor.run(tiled_graph(seed=4))
    assert after["ok"], after["error"]


def test_tiled_refine_asks_comfyui_for_one_tiles_memory(executor, comfy, monkeypatch):
    """The memory the node asks load_models_gpu for (recorded by a pass-through wrapper) is what the plain Sampler
    asks for an image of the tile's size, and less than for the whole canvas."""
    import comfy.model_management as mm

    asked = []
    real = mm.load_models_gpu

    def spy(models, memory_required=0, *args, **kwargs):
        kinds = [type(m.model.inner).__name__ for m in models if hasattr(m.model, "inner")]
        if kinds == ["PixArtTransformer2DModel"]:
            asked.append(memory_required)
        return real(models, memory_required, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    runs = {}
    for label, prompt in (("tiled", tiled_graph(seed=21, canvas=128, tile=64)),
                          ("sampler64", graph(seed=22, steps=1, width=64, height=64)),
                          ("sampler128", graph(seed=23, steps=1, width=128, height=128))):
        asked.clear()
        assert executor.run(prompt)["ok"]
        runs[label] = asked[-1]
    assert runs["tiled"] == runs["sampler64"] < runs["sampler128"]


def test_tiled_refine_refuses_a_half_set_tile_and_too_much_overlap(executor):
    p = tiled_graph()
    p["10"]["inputs"]["tile_height"] = 0
    result = executor.run(p)
    assert not result["ok"] and "set both tile_width and tile_height" in result["error"]["exception_message"]
    result = executor.run(tiled_graph(overlap=64))
    assert not result["ok"] and "overlap 64 px must be a multiple of 8 and smaller than the tile (64x64)" in \
        result["error"]["exception_message"]
    assert executor.run(tiled_graph(canvas=64, overlap=256, steps=2))["ok"]  # one tile: the overlap does not matter

"""The hires nodes in ComfyUI's executor: Hires Upscale to diffusers' 2K bins, through the VAE (against diffusers'
VAE and torch's resize) and in latent space for each upscale mode (against ComfyUI's and torch's resize); Tiled
Refine's progress and cancel per tile, the memory it asks ComfyUI for, its errors, and its numbers: one tile is the
Sampler's img2img on the VAE-scaled latent, two tiles blend as MultiDiffusion written out, each tile's
micro-conditioning, the default tile against diffusers' bins."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from harness.comfyui import dit_handle
from harness.graphs import graph
from pixart_core import sampling


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
    from harness.comfyui import pack

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

    from harness.graphs import saved_images as _saved_images

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


# ------------------------------------------------------------------------------------ Tiled Refine's numbers

def _refine(comfy, handle, conds, latent, **settings):
    """PixArt-Σ Tiled Refine's LATENT samples (the node run directly, in this process)."""
    pos, neg = conds
    inputs = {**dict(seed=5, steps=10, cfg=4.5, scheduler="dpm++ 2m", denoise=0.35, tile_width=0, tile_height=0,
                     overlap=0), **settings}
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTiledRefine"]
    return node.execute(dit=handle, positive=pos, negative=neg, latent=latent, **inputs).result[0]["samples"]


@pytest.mark.parametrize("variant,vae", [("sigma-1024", "sdxl"), ("alpha-512", "sd")])
def test_tiled_refine_in_one_tile_is_img2img_on_the_vae_scaled_latent(comfy, conds, variant, vae):
    """One tile covering the canvas: Tiled Refine is the plain Sampler's img2img with the same seed and denoise,
    bit for bit, and both are our sampling of the LATENT times the VAE's scaling factor, as diffusers' pipelines scale
    a VAE latent (the released values: 0.13025 for the SDXL VAE of Σ, 0.18215 for the SD VAE of α;
    reference_settings), divided by it again: bit for bit too."""
    pos, neg = conds
    dit = tiny.make_dit(variant=variant, seed=3)
    handle = dit_handle(copy.deepcopy(dit), variant)
    latent = {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(8))}
    tiled = _refine(comfy, handle, conds, latent, tile_width=96, tile_height=64)
    sampler = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSampler"]
    plain = sampler.execute(dit=handle, positive=pos, negative=neg, seed=5, steps=10, cfg=4.5, scheduler="dpm++ 2m",
                            width=96, height=64, batch_size=1, latent=latent, denoise=0.35).result[0]["samples"]
    assert torch.equal(tiled, plain)
    scale = reference.VAE_SCALING[vae]
    noise, gen = sampling.initial_noise(5, 1, 4, 64, 96)
    want = sampling.sample(dit, pos, neg, noise, generator=gen, steps=10, cfg=4.5, scheduler="dpmpp_2m",
                           init_latents=latent["samples"] * scale, denoise=0.35) / scale
    assert torch.equal(tiled, want)


def test_tiled_refine_blends_two_tiles_with_linear_ramps(comfy, conds):
    """MultiDiffusion over two tiles written out: a 96x64 canvas (12x8 latent) in 64x64 tiles overlapping by 32 px
    lies at latent columns 0-7 and 4-11; over the 4 shared columns the left tile's weight falls (p + 0.5) / 4 from
    the right (0.875, 0.625, 0.375, 0.125) and the right tile's rises. One step (dpm++ 2m, 4 steps, denoise 0.25:
    the step at timestep 250, to sigma 0; cfg 1: one DiT pass per tile), so the output is diffusers' step from the
    noised latent with the blended epsilon: at column 1 the left tile's alone, at column 5 0.625 x left (its column
    5) + 0.375 x right (its column 1), at column 10 the right tile's alone (its column 6). The tiles' predictions
    are read off the DiT with a forward hook."""
    dit = tiny.make_dit(seed=3)
    handle = dit_handle(copy.deepcopy(dit), "sigma-1024")
    inner = handle.patcher.model.inner
    seen = []
    hook = inner.register_forward_hook(lambda m, args, out: seen.append(out[0][:, :4].detach().clone()))
    latent = {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(8))}
    try:
        got = _refine(comfy, handle, conds, latent, steps=4, cfg=1.0, denoise=0.25, tile_width=64, tile_height=64,
                      overlap=32)
    finally:
        hook.remove()
    left, right = seen  # [1, 4, 8, 8] each
    eps = torch.stack([left[..., 1], 0.625 * left[..., 5] + 0.375 * right[..., 1], right[..., 6]], dim=-1)
    scale = reference.VAE_SCALING["sdxl"]
    sch = reference.scheduler("dpmpp_2m")
    sch.set_timesteps(4)
    t = sch.timesteps[3]
    assert int(t) == 250
    noise, _ = sampling.initial_noise(5, 1, 4, 64, 96)
    columns = [1, 5, 10]
    noisy = sch.add_noise(latent["samples"] * scale, noise, t.reshape(1))
    want = sch.step(eps, t, noisy[..., columns]).prev_sample / scale
    assert torch.allclose(got[..., columns], want, rtol=1e-5, atol=1e-6)


def test_tiled_refine_gives_each_tile_its_size_as_micro_conditioning(comfy, conds):
    """PixArt-α 1024-MS reads the image's size and aspect ratio (diffusers' PixArtAlphaPipeline passes [height,
    width] and height / width): in Tiled Refine each DiT call is one tile, 80 px wide and 64 px high here (a 128x64
    canvas, tile_width 80, tile_height 64), so resolution [64, 80] and aspect ratio 0.8, for every row of the CFG
    batch; never the canvas's [64, 128]."""
    handle = dit_handle(copy.deepcopy(tiny.make_dit(variant="alpha-1024")), "alpha-1024")
    inner = handle.patcher.model.inner
    assert inner.use_additional_conditions
    seen = []

    def record(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        seen.append((tuple(args[0].shape[-2:]), added["resolution"].clone(), added["aspect_ratio"].clone()))

    hook = inner.register_forward_pre_hook(record, with_kwargs=True)
    latent = {"samples": torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(8))}
    try:
        _refine(comfy, handle, conds, latent, steps=4, denoise=0.5, tile_width=80, tile_height=64, overlap=32)
    finally:
        hook.remove()
    assert len(seen) == 2 * 2  # two tiles (latent columns 0-9 and 6-15) x two steps
    resolution, aspect_ratio = torch.tensor([[64.0, 80.0]] * 2), torch.tensor([[64 / 80]] * 2)  # float32, as diffusers
    assert all(shape == (8, 10) and torch.equal(res, resolution) and torch.equal(ar, aspect_ratio)
               for shape, res, ar in seen)


def test_tiled_refine_default_tile_is_the_dits_bin(comfy, conds):
    """tile_width/height 0 with a Σ-256 DiT on a 640x384 canvas: the tiles are the 256 bin diffusers'
    classify_height_width_bin picks for 384/640 from ASPECT_RATIO_256_BIN; the DiT sees that size on every call."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    handle = dit_handle(copy.deepcopy(tiny.make_dit(variant="sigma-256")), "sigma-256")
    shapes = set()
    hook = handle.patcher.model.inner.register_forward_pre_hook(lambda m, args: shapes.add(tuple(args[0].shape[-2:])))
    latent = {"samples": torch.randn(1, 4, 48, 80, generator=torch.Generator().manual_seed(8))}
    try:
        _refine(comfy, handle, conds, latent, steps=4, denoise=0.25, overlap=64)
    finally:
        hook.remove()
    h, w = PixArtImageProcessor.classify_height_width_bin(384, 640, ratios=ASPECT_RATIO_256_BIN)
    assert shapes == {(h // 8, w // 8)}


@pytest.mark.parametrize("mode", ["bilinear", "nearest-exact", "area", "bicubic"])
def test_hires_upscale_latent_modes_as_torch_and_comfyui(comfy, mode):
    """Hires Upscale's latent method for each upscale mode: to a size of the same aspect ratio it is ComfyUI's own
    latent upscale (comfy.utils.common_upscale, no crop); to another aspect ratio torch's interpolate to the covering
    size, centre-cropped, written out here (8x6 latent to 16x16: scale 16/6, covering 21x16, rows 2-17)."""
    from comfy.utils import common_upscale

    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(3))

    def upscale(width, height):
        return node.execute(samples={"samples": z}, family="2048", method="latent", upscale_mode=mode, width=width,
                            height=height).result[0]["samples"]

    assert torch.equal(upscale(96, 128), common_upscale(z, 12, 16, mode, "disabled"))
    want = torch.nn.functional.interpolate(z, size=(21, 16), mode=mode)[..., 2:18, :]
    assert torch.equal(upscale(128, 128), want)


def test_tiled_refine_previews_the_whole_canvas_after_each_step(executor, comfy, comfy_base):
    """With ComfyUI's latent2rgb previews on, the tiled node's bar gets one preview per step (after the step's 9
    tiles: values 9 and 18), each of the whole 128 px canvas (16 x 16 latent pixels), and the last is ComfyUI's
    SDXL latent2rgb preview of the node's output latent (latent_preview.get_previewer, comfy.latent_formats.SDXL)."""
    import comfy.latent_formats
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    from safetensors.torch import load_file

    seen = []

    def record(value, total, preview, node_id=None):
        if total == 18 and preview is not None:
            seen.append((value, preview))

    p = tiled_graph(seed=5, prefix="tiled_preview")
    p["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "tiled_preview_latent"}}
    comfy.utils.set_progress_bar_global_hook(record)
    saved, args.preview_method = args.preview_method, LatentPreviewMethod.Latent2RGB
    try:
        result = executor.run(p)
    finally:
        args.preview_method = saved
        comfy.utils.set_progress_bar_global_hook(None)
    assert result["ok"], result["error"]
    assert [v for v, _ in seen] == [9, 18]
    assert all(kind == "JPEG" and image.size == (16, 16) for _, (kind, image, _) in seen)
    latent_file = max((comfy_base / "output").glob("tiled_preview_latent*.latent"), key=lambda f: f.stat().st_mtime)
    out = load_file(str(latent_file))["latent_tensor"]
    fmt = comfy.latent_formats.SDXL()
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    expected = previewer.decode_latent_to_preview(fmt.process_in(out))
    got = seen[-1][1][1]
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max()
    assert diff <= 1, diff

"""The hires nodes in ComfyUI's executor: Hires Upscale to diffusers' 2K bins and through the VAE (against diffusers'
VAE and torch's resize), Tiled Refine's progress and cancel per tile, the memory it asks ComfyUI for, and its
errors."""
from __future__ import annotations

import pytest
import torch

from harness import models as tiny
from harness.graphs import graph


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

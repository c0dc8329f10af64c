"""The sampler nodes through ComfyUI's executor: resolution bins, resize-back, img2img, batches, previews."""
from __future__ import annotations

import numpy as np
import pytest

from harness.graphs import graph
from harness.graphs import saved_images as _saved_images


@pytest.mark.parametrize("family", [256, 512, 1024, 2048])
def test_resolution_bins_match_diffusers_classify(comfy, family):
    from diffusers.image_processor import PixArtImageProcessor

    from pixart_core import resolution

    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaResolution"]
    table = resolution.bins(family)
    for w in range(64, 4097, 176):
        for h in range(64, 4097, 208):
            want_h, want_w = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)
            out = node.execute(width=w, height=h, family=str(family)).result
            assert out == (want_w, want_h, w, h), (w, h)
    # orientation: a landscape request gets a landscape bin, a portrait one a portrait bin
    lw, lh = resolution.snap(1920, 1080, family)
    pw, ph = resolution.snap(1080, 1920, family)
    assert lw > lh and ph > pw and (lw, lh) == (ph, pw)


def _with_resolution(prompt: dict, width: int, height: int, family: str) -> dict:
    prompt["9"] = {"class_type": "PixArtSigmaResolution",
                   "inputs": {"width": width, "height": height, "family": family, "dit": ["3", 0]}}
    prompt["4"]["inputs"].update(width=["9", 0], height=["9", 1])
    prompt["6"]["inputs"].update(target_width=["9", 2], target_height=["9", 3])
    return prompt


def test_1000px_request_samples_at_the_bin_and_returns_1000px(executor, comfy_base):
    prompt = _with_resolution(graph(steps=2, save_latent=True, prefix="binned"), 1000, 1000, "from dit")
    result = executor.run(prompt)
    assert result["ok"], result["error"]
    assert _saved_images(result, comfy_base)[0].shape == (1000, 1000, 3)
    info = result["outputs"]["8"]["latents"][0]
    from safetensors.torch import load_file

    latent = load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]
    assert latent.shape[-2:] == (128, 128)  # sampled at the 1024x1024 bin


def test_img2img_through_nodes_stays_close_to_the_input(executor, comfy, comfy_base):
    import folder_paths
    from PIL import Image

    rng = np.random.default_rng(0)  # a two-colour picture with some grain
    pic = np.zeros((64, 64, 3), dtype=np.uint8)
    pic[:, :32] = (220, 40, 40)
    pic[:, 32:] = (30, 60, 200)
    pic = np.clip(pic + rng.integers(0, 20, pic.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pic).save(f"{folder_paths.get_input_directory()}/img2img_src.png")

    from safetensors.torch import load_file

    def latent_of(result, node):
        info = result["outputs"][node]["latents"][0]
        return load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]

    def run(denoise, img2img, prefix):
        p = graph(steps=10, prefix=prefix, seed=5, save_latent=True)
        if img2img:
            p["10"] = {"class_type": "LoadImage", "inputs": {"image": "img2img_src.png"}}
            p["11"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["10", 0]}}
            p["12"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix + "_src"}}
            p["4"]["inputs"].update(latent=["11", 0], denoise=denoise)
        r = executor.run(p)
        assert r["ok"], r["error"]
        assert _saved_images(r, comfy_base)[0].shape == (64, 64, 3)
        return latent_of(r, "8"), (latent_of(r, "12") if img2img else None)

    # Compared in latent space: a random tiny VAE does not reproduce pictures, so pixels say nothing here.
    (i2i, source), (t2i, _) = run(0.5, True, "i2i"), run(1.0, False, "t2i")
    (light, _) = run(0.1, True, "light")
    dist = lambda a: (a - source).norm().item()  # noqa: E731
    assert dist(i2i) < dist(t2i)
    assert dist(light) < dist(i2i)  # less denoise stays closer still


def test_batch_of_four_with_long_negative_and_same_seed_repeats(executor, comfy_base, caplog):
    long_negative = "blurry, low quality, watermark, " * 120
    p = graph(batch=4, negative=long_negative, prefix="batch4", seed=77)
    first = executor.run(p)
    assert first["ok"], first["error"]
    assert "cut off" in caplog.text  # the negative was truncated to 300 tokens with a warning
    images = _saved_images(first, comfy_base)
    assert len(images) == 4 and len({im.tobytes() for im in images}) == 4
    p2 = graph(batch=4, negative=long_negative, prefix="batch4b", seed=77)
    p2["4"]["inputs"]["cfg"] = 4.5000001  # defeat ComfyUI's output cache so the sampler really runs again
    second = executor.run(p2)
    assert second["ok"]
    cached = next(d["nodes"] for e, d in second["messages"] if e == "execution_cached")
    assert "4" not in cached, "the sampler's output came from ComfyUI's cache"
    assert [a.tobytes() for a in images] == [b.tobytes() for b in _saved_images(second, comfy_base)]


def test_sampler_sends_progress_with_latent_previews(executor, comfy, comfy_base):
    """A preview per step; the last is ComfyUI's SDXL latent2rgb preview (latent_preview.Latent2RGBPreviewer with
    comfy.latent_formats.SDXL's factors; what --preview-method auto gives without TAESD files) of the output latent."""
    import comfy.latent_formats
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    from safetensors.torch import load_file

    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append((v, t, preview)))
    saved, args.preview_method = args.preview_method, LatentPreviewMethod.Auto
    try:
        assert executor.run(graph(seed=31, steps=4, save_latent=True, prefix="previewed"))["ok"]
    finally:
        args.preview_method = saved
        comfy.utils.set_progress_bar_global_hook(None)
    steps = [(v, t) for v, t, p in seen if t == 4]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [p for v, t, p in seen if t == 4]
    assert all(p is not None and p[0] == "JPEG" and p[1].size == (8, 8) for p in previews)
    latent = max((comfy_base / "output").glob("previewed*.latent"), key=lambda f: f.stat().st_mtime)
    fmt = comfy.latent_formats.SDXL()
    want = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias
                                              ).decode_latent_to_preview(fmt.process_in(load_file(str(latent))["latent_tensor"]))
    diff = np.abs(np.asarray(previews[-1][1], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()
    assert diff <= 1, diff


def test_resolution_from_dit_without_a_dit_says_what_to_do(comfy):
    with pytest.raises(ValueError) as e:
        comfy.NODE_CLASS_MAPPINGS["PixArtSigmaResolution"].execute(width=1000, height=1000, family="from dit")
    assert str(e.value) == ("PixArt resolution: family is 'from dit' but no DiT is connected; connect one or pick a "
                            "family.")


def test_img2img_progress_counts_the_steps_that_run(executor, comfy):
    """denoise 0.5 of 4 steps runs 2 steps (diffusers' img2img rule: int(4 * 0.5) timesteps, its get_timesteps): the
    bar goes 1/2, 2/2, not to 2 of 4."""
    import comfy.utils

    seen = []
    p = graph(seed=33, steps=4, prefix="img2img_progress")
    p["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["4"]["inputs"].update(latent=["12", 0], denoise=0.5)
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append((v, t)))
    try:
        result = executor.run(p)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert result["ok"], result["error"]
    assert [s for s in seen if s[1] in (2, 4)][:2] == [(1, 2), (2, 2)]

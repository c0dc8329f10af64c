"""PixArt-Σ Sampler (Advanced) and the sampler's mask input in ComfyUI: inpainting from Load Image's mask (MASK input
and Set Latent Noise Mask) with the mask resized as ComfyUI's prepare_mask, two stages chained as KSamplerAdvanced
users chain them, PAG on the DiT as the pack runs it (ComfyUI's cast-weights layers) against diffusers'
PixArtSigmaPAGPipeline, the node's inputs and its DMD timestep."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import reference_settings as reference
from cases import SIZE
from cases import noise as _noise
from harness import models as tiny
from harness.graphs import ADVANCED
from harness.graphs import advanced_sampler as _advanced
from harness.graphs import graph
from pixart_core import inpaint, sampling, schedulers


def _latent(result, node, comfy_base):
    from safetensors.torch import load_file

    info = result["outputs"][node]["latents"][0]
    return load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


@pytest.fixture(scope="module")
def inpaint_image(comfy):
    """A 64x64 RGBA picture with a transparent square: Load Image's MASK is 1 there (the part to repaint)."""
    import folder_paths

    rng = np.random.default_rng(1)
    rgba = np.concatenate([rng.integers(0, 255, (64, 64, 3)), np.full((64, 64, 1), 255)], axis=-1).astype(np.uint8)
    rgba[16:40, 8:32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(f"{folder_paths.get_input_directory()}/inpaint_src.png")
    return "inpaint_src.png"


def test_inpainting_through_nodes_mask_input_equals_noise_mask(executor, comfy_base, inpaint_image):
    p = graph(steps=3, save_latent=True, prefix="inpaint_nm")
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": inpaint_image}}
    p["11"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["10", 0]}}
    p["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    p["4"]["inputs"].update(latent=["12", 0])
    p["13"] = {"class_type": "PixArtSigmaSampler", "inputs": {**p["4"]["inputs"], "latent": ["11", 0], "mask": ["10", 1]}}
    p["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "inpaint_mask"}}
    p["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "inpaint_src"}}
    # the Advanced sampler's mask input, against its own noise_mask run (denoise 1: the whole schedule)
    p["16"] = _advanced(latent=["12", 0], steps=3)
    p["17"] = _advanced(latent=["11", 0], mask=["10", 1], steps=3)
    for node in ("16", "17"):
        p[f"save_{node}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [node, 0], "filename_prefix": f"adv_{node}"}}
    r = executor.run(p)
    assert r["ok"], r["error"]
    via_noise_mask, via_mask, source = (_latent(r, n, comfy_base) for n in ("8", "14", "15"))
    assert torch.equal(via_noise_mask, via_mask)
    advanced_noise_mask, advanced_mask = (_latent(r, f"save_{n}", comfy_base) for n in ("16", "17"))
    assert torch.equal(advanced_noise_mask, advanced_mask)
    assert torch.allclose(advanced_mask[..., 6:, 6:], source[..., 6:, 6:], rtol=1e-6, atol=1e-7)  # kept outside
    # the transparent square (pixels 16:40 x 8:32) is latent rows 2:5, columns 1:4; far from it nothing changes
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[1:6, 0:5] = False
    # (the image itself, through the sampler's model scale and back: equal to float rounding)
    assert torch.allclose(via_mask[..., keep], source[..., keep], rtol=1e-6, atol=1e-7)
    assert (via_mask[..., 2:5, 1:4] - source[..., 2:5, 1:4]).abs().min() > 0


def test_two_advanced_stages_equal_one_sampler_run(executor, comfy_base):
    p = graph(steps=4, seed=7, save_latent=True, prefix="one_run")
    p["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["11"] = _advanced(latent=["10", 0], end_step=2, return_with_leftover_noise="enable")
    p["12"] = _advanced(latent=["11", 0], add_noise="disable", seed=12345, start_step=2)
    p["13"] = {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "two_stages"}}
    p["14"] = _advanced(latent=["10", 0])  # one advanced run from the empty latent: plain text-to-image
    p["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": "advanced_one"}}
    r = executor.run(p)
    assert r["ok"], r["error"]
    one, two, advanced = (_latent(r, n, comfy_base) for n in ("8", "13", "15"))
    assert torch.equal(one, two) and torch.equal(one, advanced)
    # Queued again with only stage 2 changed: stage 1 comes from ComfyUI's cache, its state was not used up
    p["12"]["inputs"]["seed"] = 999
    again = executor.run(p)
    assert again["ok"], again["error"]
    cached = next(d["nodes"] for e, d in again["messages"] if e == "execution_cached")
    assert "11" in cached and "12" not in cached
    assert torch.equal(_latent(again, "13", comfy_base), one)


def test_advanced_cfg_interval_reaches_the_loop(comfy, conds):
    """cfg_start 0.2 and cfg_end 0.6 of 10 steps: the negative pass runs on the steps that start at 0.2 ... 0.5 of
    the schedule, 2 to 5 (a forward pre-hook counts the DiT's batch per step: 2 = negative and positive). The
    output LATENT keeps the input's other keys (batch_index here)."""
    from harness.graphs import DIT_FILE

    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSamplerAdvanced"]
    dit = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaDiTLoader"].execute(dit_name=DIT_FILE, variant="auto",
                                                                     dtype="fp32").result[0]
    sizes = []
    hook = dit.patcher.model.inner.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        out = node.execute(dit=dit, positive=conds[0], negative=conds[1],
                           latent={"samples": torch.zeros(1, 4, 8, 8), "batch_index": [0]},
                           **{**ADVANCED, "steps": 10, "cfg_start": 0.2, "cfg_end": 0.6}).result[0]
    finally:
        hook.remove()
    assert sizes == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
    assert out["batch_index"] == [0]  # the input LATENT's other keys kept, as KSamplerAdvanced keeps them


def test_advanced_from_step_0_on_an_image_latent_noises_it_as_ksampler_advanced(executor, comfy_base, inpaint_image):
    """An encoded image (not an empty latent) sampled from step 0 with add_noise: the image latent plus the seed's
    noise, as ComfyUI's KSamplerAdvanced (euler, 'normal' schedule: diffusers' Euler timesteps) does on the bridged
    model; agrees to 5e-5 of the range (diffusers' Euler starts from sigma_max * noise added, ComfyUI's from
    sqrt(1 + sigma_max²) * noise, 2e-5 apart). Sampling the empty latent instead is 10 times further off."""
    p = _bridged_graph(steps=10, seed=9, scheduler="euler", prefix="adv_from_0")
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": inpaint_image}}
    p["11"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["10", 0]}}
    p["30"] = _advanced(latent=["11", 0], seed=9, steps=10, scheduler="euler")
    p["31"] = _ksampler_advanced(["11", 0])
    for node in ("4", "30", "31"):
        _save(p, node, f"adv_from_0_{node}")
    r = executor.run(p)
    assert r["ok"], r["error"]
    empty, ours, theirs = (_saved(r, comfy_base, n) for n in ("4", "30", "31"))
    assert _close(ours, theirs, 5e-5)
    assert not _close(empty, theirs, 1e-4)  # 1.9e-4 measured: the image weighs 1 / sigma_max of the start


def test_advanced_node_inputs(comfy):
    info = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSamplerAdvanced"].GET_NODE_INFO_V1()
    required = info["input"]["required"]
    assert required["dmd_timestep"][1]["default"] == reference.DMD_TIMESTEPS[0]
    # PAG's layers: diffusers' PixArtSigmaPAGPipeline's default
    import inspect

    from diffusers import PixArtSigmaPAGPipeline

    pipeline_default = inspect.signature(PixArtSigmaPAGPipeline.__init__).parameters["pag_applied_layers"].default
    assert required["pag_layers"][1]["default"] == pipeline_default
    # KSamplerAdvanced's staged-sampling inputs, with its defaults
    ks = comfy.NODE_CLASS_MAPPINGS["KSamplerAdvanced"].INPUT_TYPES()["required"]
    assert required["start_step"][1]["default"] == ks["start_at_step"][1]["default"]
    assert required["end_step"][1]["default"] == ks["end_at_step"][1]["default"]
    for name, ks_name in (("add_noise", "add_noise"), ("return_with_leftover_noise", "return_with_leftover_noise")):
        assert required[name][1]["options"] == ks[ks_name][0] and required[name][1]["default"] == ks[ks_name][0][0]
    assert list(info["input"]["optional"]) == ["mask"]
    # the plain sampler's new input is an optional socket after its widgets: saved workflows load unchanged
    plain = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSampler"].GET_NODE_INFO_V1()
    assert info["input_order"]["optional"] == ["mask"] and plain["input_order"]["optional"][-1] == "mask"


def test_bad_pag_layer_is_a_clear_error_and_the_server_goes_on(executor):
    p = graph(steps=2)
    p["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["11"] = _advanced(latent=["10", 0], pag_scale=2.0, pag_layers="blocks.99")
    p["6"]["inputs"]["samples"] = ["11", 0]
    r = executor.run(p)
    assert not r["ok"] and "no self-attention layer matches 'blocks.99'" in str(r["error"])
    p["11"]["inputs"]["pag_layers"] = "blocks.1"
    assert executor.run(p)["ok"]


def test_advanced_dmd_timestep_reaches_the_loop(executor, comfy_base):
    """The plain sampler's dmd step is at 400; the advanced one at 400 gives the same latents, at 599 others."""
    p = graph(steps=1, cfg=1.0, seed=3, save_latent=True, prefix="dmd_plain")
    p["4"]["inputs"]["scheduler"] = "dmd 1-step (t=400)"
    p["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    for node, t in (("11", 400), ("13", 599)):
        p[node] = _advanced(latent=["10", 0], seed=3, steps=1, cfg=1.0, scheduler="dmd 1-step (t=400)", dmd_timestep=t)
        p[str(int(node) + 1)] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": f"dmd{t}"}}
    r = executor.run(p)
    assert r["ok"], r["error"]
    plain, at400, at599 = (_latent(r, n, comfy_base) for n in ("8", "12", "14"))
    assert torch.equal(plain, at400) and (at599 - at400).abs().max() > 1e-3


# the last two: a latent fewer rows high than it has channels (the channel repeat must follow the channels), more
# masks than channels but fewer than latents (the batch repeat must follow the batch)
@pytest.mark.parametrize("mask_shape,latent_shape", [((64, 96), (1, 4, 8, 12)), ((2, 37, 51), (2, 4, 8, 12)),
                                                     ((1, 1, 40, 40), (3, 4, 5, 5)), ((3, 24, 24), (2, 4, 6, 6)),
                                                     ((8, 40), (1, 4, 1, 5)), ((4, 24, 24), (5, 4, 3, 3))])
def test_mask_is_resized_as_comfyui_prepare_mask(comfy, mask_shape, latent_shape):
    import comfy.sampler_helpers

    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(0))
    want = comfy.sampler_helpers.prepare_mask(mask, latent_shape, "cpu")
    got = inpaint.latent_mask(mask, latent_shape)
    assert got.shape == want.shape == latent_shape and torch.equal(got, want)


def _cast_copy(dit):
    """The DiT as the pack runs it: ComfyUI's cast-weights layers (the pack's nodes/comfy/loading.castable, as ComfyUI
    loaded it)."""
    import sys

    management = next(m for name, m in sys.modules.items() if name.endswith("nodes.comfy.loading")
                      and hasattr(m, "castable"))
    model = management.castable(copy.deepcopy(dit))
    assert any(getattr(m, "comfy_cast_weights", None) is not None for m in model.modules())
    return model


@pytest.mark.parametrize("cfg", [4.5, 1.0])
@pytest.mark.parametrize("layers", ["blocks.1", "blocks.(0|1)"])
def test_pag_matches_diffusers_pag_pipeline(comfy, dit_and_conds, cfg, layers):
    from diffusers import PixArtSigmaPAGPipeline

    dit, pos, neg = dit_and_conds
    ours_model = _cast_copy(dit)
    before = dict(ours_model.attn_processors)
    noise, gen = _noise()
    ours = sampling.sample(ours_model, pos, neg, noise, steps=4, cfg=cfg, generator=gen, pag_scale=3.0,
                           pag_layers=layers)
    assert {k: id(v) for k, v in ours_model.attn_processors.items()} == {k: id(v) for k, v in before.items()}

    pipe = PixArtSigmaPAGPipeline(tokenizer=None, text_encoder=None, vae=tiny.make_vae(), transformer=dit,
                                  scheduler=reference.scheduler(schedulers.DEFAULT), pag_applied_layers=layers)
    ref = pipe(prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, negative_prompt_embeds=neg.embeds,
               negative_prompt_attention_mask=neg.mask, num_images_per_prompt=2, latents=noise.clone(),
               num_inference_steps=4, guidance_scale=cfg, pag_scale=3.0, height=SIZE, width=SIZE,
               output_type="latent", use_resolution_binning=False).images
    noise, gen = _noise()
    plain = sampling.sample(dit, pos, neg, noise, steps=4, cfg=cfg, generator=gen)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-2  # PAG changed the result


# ---------------------------------------------------------------------------------- against ComfyUI's inpainting

def _feathered_mask() -> torch.Tensor:
    """A 64x64 MASK (1 = repaint) over a rectangle with 16 px linear edges: soft values wherever ComfyUI's resize to
    the 8x8 latent samples it (pixels 3.5 + 8k)."""
    p = torch.arange(64, dtype=torch.float32) + 0.5
    rows = ((p - 8) / 16).clamp(0, 1) * ((56 - p) / 16).clamp(0, 1)
    cols = ((p - 4) / 16).clamp(0, 1) * ((44 - p) / 16).clamp(0, 1)
    return (rows[:, None] * cols[None, :])[None]  # [1, 64, 64]


def _release_sigmas(model, name: str, steps: int) -> torch.Tensor:
    """The sigmas of the published scheduler's timesteps (ComfyUI's discrete sigmas at them), then 0."""
    s = reference.scheduler(name)
    s.set_timesteps(steps)
    return torch.cat([model.model.model_sampling.sigma(s.timesteps.float()), torch.zeros(1)])


@pytest.mark.parametrize("stage", ["img2img", "restarted stage"])
def test_inpainting_equals_comfyui_inpainting_on_the_bridged_model(comfy, conds, stage):
    """ComfyUI's inpainting (comfy.sample.sample_custom, SamplerCustomAdvanced's path: KSamplerX0Inpaint with the
    latent's noise mask) with its dpmpp_2m on the bridged MODEL, on the sigmas of the published DPM-Solver++
    schedule from step 4 of 10, against our sampler with the same mask, noise and schedule: the whole latent agrees
    to 1e-5 of its range (fp32 rounding; the bridge itself agrees to 1e-5). img2img: denoise 0.6 (steps 4-9) adds the
    seed's noise to the image. A restarted stage (start_step 4, add_noise off, no solver state; KSamplerAdvanced's
    add_noise disable gives ComfyUI zero noise): the region outside the mask is kept as given, with no new noise."""
    import comfy.sample as comfy_sample
    import comfy.samplers as comfy_samplers

    from harness.comfyui import dit_handle, pack

    bridge = pack("nodes.bridge")
    pos, neg = conds
    dit = tiny.make_dit(seed=4)
    model = bridge.to_model(dit_handle(copy.deepcopy(dit), "sigma-1024"))
    scale = reference.VAE_SCALING["sdxl"]
    mask = _feathered_mask()
    noise, gen = sampling.initial_noise(11, 1, 4, 64, 64)
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigmas = _release_sigmas(model, "dpmpp_2m", 10)[4:]
    if stage == "img2img":
        ours = sampling.sample(dit, pos, neg, noise, steps=10, cfg=4.5, scheduler="dpmpp_2m", generator=gen,
                               init_latents=image, denoise=0.6, mask=mask)
        comfy_noise = noise
    else:
        image = image + float(sigmas[0]) * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
        ours = sampling.sample(dit, pos, neg, noise, steps=10, cfg=4.5, scheduler="dpmpp_2m", generator=gen,
                               init_latents=image, start_step=4, add_noise=False, mask=mask)
        comfy_noise = torch.zeros_like(noise)
    theirs = comfy_sample.sample_custom(model, comfy_noise, 4.5, comfy_samplers.sampler_object("dpmpp_2m"), sigmas,
                                        bridge.to_conditioning(pos), bridge.to_conditioning(neg), image / scale,
                                        noise_mask=mask, seed=11) * scale
    assert ((theirs - ours).abs().max() / ours.abs().max()).item() <= 1e-5
    outside = inpaint.latent_mask(mask, ours.shape) == 0
    assert torch.equal(ours[outside], image[outside])  # the image (a restarted stage: its noisy input) kept as given


@pytest.fixture(scope="module")
def feathered_image(comfy):
    """A 64x64 RGBA picture transparent over _feathered_mask (Load Image's MASK = 1 - alpha: soft edges)."""
    import folder_paths

    rgb = np.random.default_rng(2).integers(0, 255, (64, 64, 3))
    alpha = np.round(255 * (1 - _feathered_mask()[0].numpy()))[..., None]
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1).astype(np.uint8), "RGBA").save(
        f"{folder_paths.get_input_directory()}/inpaint_feathered.png")
    return "inpaint_feathered.png"


def _ksampler_advanced(latent, add_noise="enable", start=0, end=10000, leftover="disable", seed=9, steps=10,
                       sampler="euler", scheduler="normal") -> dict:
    """ComfyUI's KSamplerAdvanced on the bridged MODEL (node 20) and CONDITIONINGs (nodes 21, 22)."""
    return {"class_type": "KSamplerAdvanced",
            "inputs": {"model": ["20", 0], "positive": ["21", 0], "negative": ["22", 0], "latent_image": latent,
                       "add_noise": add_noise, "noise_seed": seed, "steps": steps, "cfg": 4.5, "sampler_name": sampler,
                       "scheduler": scheduler, "start_at_step": start, "end_at_step": end,
                       "return_with_leftover_noise": leftover}}


def _bridged_graph(**overrides) -> dict:
    """graph()'s loaders and encoder, its Sampler (node 4), the DiT and both conditionings bridged to ComfyUI's
    types (nodes 20-22); no decode."""
    p = graph(**overrides)
    del p["6"], p["7"]
    p["20"] = {"class_type": "PixArtSigmaDiTToModel", "inputs": {"dit": ["3", 0]}}
    for node, output in (("21", 0), ("22", 1)):
        p[node] = {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", output]}}
    return p


def _save(p: dict, node: str, name: str) -> None:
    p[f"save_{node}"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": name}}


def _saved(result, comfy_base, node):
    return _latent(result, f"save_{node}", comfy_base)


def test_inpainting_through_nodes_equals_ksampler_advanced(executor, comfy_base, feathered_image):
    """Load Image (soft-edged alpha) -> VAE Encode -> Set Latent Noise Mask, then our Sampler (euler, 10 steps,
    denoise 0.6) and ComfyUI's KSamplerAdvanced (euler, 'normal' schedule, start_at_step 4: diffusers' Euler
    timesteps on its linspace, 999, 888, ..., 0, are ComfyUI's 'normal' ones; both first-order Euler) through the
    bridge: the whole latent agrees to 1e-5 of its range. A stage that restarts on KSamplerAdvanced's stage-1 output
    (add_noise disable, start_step 4) agrees with KSamplerAdvanced's own stage 2, and keeps the noisy input outside
    the mask as it is."""
    p = _bridged_graph(steps=10, seed=9, scheduler="euler", denoise=0.6, prefix="inpaint_vs_comfy")
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": feathered_image}}
    p["11"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["10", 0]}}
    p["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    p["4"]["inputs"]["latent"] = ["12", 0]
    p["23"] = _ksampler_advanced(["12", 0], start=4)
    p["24"] = _ksampler_advanced(["12", 0], end=4, leftover="enable")
    p["25"] = _advanced(latent=["24", 0], add_noise="disable", seed=9, steps=10, scheduler="euler", start_step=4)
    p["26"] = _ksampler_advanced(["24", 0], add_noise="disable", start=4)
    for node in ("4", "23", "24", "25", "26"):
        _save(p, node, f"inpaint_vs_comfy_{node}")
    r = executor.run(p)
    assert r["ok"], r["error"]
    ours, theirs, stage1, ours_2, theirs_2 = (_saved(r, comfy_base, n) for n in ("4", "23", "24", "25", "26"))
    mask = inpaint.latent_mask(_feathered_mask(), ours.shape)
    assert bool(((mask > 0) & (mask < 1)).any())  # soft edges reach the latent
    for a, b in ((ours, theirs), (ours_2, theirs_2)):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
    outside = mask == 0
    assert torch.allclose(ours_2[outside], stage1[outside], rtol=1e-6, atol=0)  # (model scale and back: rounding)


# ------------------------------------------------------------------------------- stages across KSamplerAdvanced

def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal to `tol` of b's range (fp32 rounding between ComfyUI's k-diffusion samplers and diffusers')."""
    return ((a - b).abs().max() / b.abs().max()).item() <= tol


@pytest.mark.parametrize("label,sampler,scheduler,steps,split", [
    # ComfyUI's 'normal' schedule at 10 steps is diffusers' Euler linspace (999, 888, ..., 0, then 0); both Euler
    ("euler", "euler", "normal", 10, 4),
    # ComfyUI's 'simple' schedule at 3 steps is the release's DPM-Solver++ linspace (999, 666, 333, then 0)
    ("dpm++ 2m", "dpmpp_2m", "simple", 3, 1),
], ids=["euler", "dpmpp_2m"])
def test_stages_continue_across_ksampler_advanced(executor, comfy_base, label, sampler, scheduler, steps, split):
    """Our Advanced sampler's stage 1 (leftover noise) continued by ComfyUI's KSamplerAdvanced through the bridge
    (add_noise disable, start_at_step), and KSamplerAdvanced's stage 1 continued by ours. Both stage-1 LATENTs are
    the same (ComfyUI's x0 + sigma * noise at the split). KSamplerAdvanced has no solver state, and ours gets none
    from ComfyUI's LATENT: with a first-order solver (Euler) each continuation is one uninterrupted run of the
    sampler that ran stage 1; the multistep DPM-Solver++ 2M restarts, the same restart on both sides (first-order
    first step), visibly off one run. Ours continuing its own stage 1 (with the state) is one run, bit for bit."""
    p = _bridged_graph(steps=steps, seed=9, scheduler=label, prefix=f"across_{sampler}")
    p["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["31"] = _advanced(latent=["30", 0], seed=9, steps=steps, scheduler=label, end_step=split,
                        return_with_leftover_noise="enable")
    p["32"] = _ksampler_advanced(["31", 0], add_noise="disable", start=split, steps=steps, sampler=sampler,
                                 scheduler=scheduler)
    p["33"] = _ksampler_advanced(["30", 0], end=split, leftover="enable", steps=steps, sampler=sampler,
                                 scheduler=scheduler)
    p["34"] = _advanced(latent=["33", 0], add_noise="disable", seed=9, steps=steps, scheduler=label, start_step=split)
    p["35"] = {"class_type": "KSampler", "inputs": {"model": ["20", 0], "positive": ["21", 0], "negative": ["22", 0],
                                                   "latent_image": ["30", 0], "seed": 9, "steps": steps, "cfg": 4.5,
                                                   "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}}
    p["36"] = _advanced(latent=["31", 0], add_noise="disable", seed=9, steps=steps, scheduler=label, start_step=split)
    nodes = ("4", "31", "32", "33", "34", "35", "36")
    for node in nodes:
        _save(p, node, f"across_{sampler}_{node}")
    r = executor.run(p)
    assert r["ok"], r["error"]
    one_run, ours_1, theirs_2, theirs_1, ours_2, ksampler, ours_with_state = (_saved(r, comfy_base, n) for n in nodes)
    # diffusers' Euler starts text-to-image from sigma_max * noise (its init_noise_sigma on linspace timesteps),
    # ComfyUI's from sqrt(1 + sigma_max²) * noise: 1 / (2 sigma_max²) = 2e-5 apart (sigma_max 157.4)
    start = 5e-5 if sampler == "euler" else 1e-5
    assert _close(ksampler, one_run, start)  # the two schedules are the same computation
    assert _close(ours_1, theirs_1, start)
    assert torch.equal(ours_with_state, one_run)
    if sampler == "euler":
        assert _close(theirs_2, one_run) and _close(ours_2, ksampler)
    else:
        assert _close(ours_2, theirs_2) and not _close(theirs_2, one_run, 1e-3)


def test_a_latent_edited_between_stages_restarts_in_the_graph(executor, comfy_base, caplog):
    """LatentMultiply and LatentAdd copy the LATENT's other keys, so stage 1's solver state reaches stage 2 with a
    changed latent: stage 2 restarts (and logs it), giving what it gives on the same latent with no state (an Empty
    Latent plus it, LatentAdd keeping the empty one's keys). Adding zeros changes nothing: the run continues."""
    import logging

    p = _bridged_graph(steps=6, seed=9, prefix="edited")
    p["30"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["31"] = _advanced(latent=["30", 0], seed=9, steps=6, end_step=3, return_with_leftover_noise="enable")
    p["32"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["31", 0], "multiplier": 1.001}}
    p["33"] = {"class_type": "LatentAdd", "inputs": {"samples1": ["30", 0], "samples2": ["32", 0]}}  # no state
    p["34"] = {"class_type": "LatentAdd", "inputs": {"samples1": ["31", 0], "samples2": ["30", 0]}}  # + 0: unchanged
    for node, latent in (("40", "32"), ("41", "33"), ("42", "34")):
        p[node] = _advanced(latent=[latent, 0], add_noise="disable", seed=9, steps=6, start_step=3)
        _save(p, node, f"edited_{node}")
    _save(p, "4", "edited_one_run")
    with caplog.at_level(logging.INFO):
        r = executor.run(p)
    assert r["ok"], r["error"]
    edited, restarted, unchanged, one_run = (_saved(r, comfy_base, n) for n in ("40", "41", "42", "4"))
    assert torch.equal(edited, restarted)
    assert caplog.text.count("the solver restarts at step 3") == 1  # the edited latent (the other has no state)
    assert torch.equal(unchanged, one_run)  # LatentAdd of zeros changes nothing: the state still continues

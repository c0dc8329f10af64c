"""PixArt ControlNet Loader and Apply through ComfyUI's executor, with tiny models: a controlled sample is the run
written out here with diffusers' own pipeline and modules (the published control order, harness/controlnet_reference
.py; the hint as the reference app makes it: image -> [-1, 1] -> VAE posterior mean x scaling factor); strength and
the schedule range act exactly where they say; stages, PAG, inpainting and Tiled Refine run with control; the adapter
goes through ComfyUI's model management; wrong files are clear errors and the next prompt runs."""
from __future__ import annotations

import numpy as np
import pytest
import reference_settings as reference
import torch
from PIL import Image

from harness import controlnet_files as cfiles
from harness import models as tiny
from harness.comfyui import pack
from harness.controlnet_reference import ReferenceAdapter, controlled
from harness.fake_gpu import (
    CPU,
    META,
    budget_for_partial,
    dit_inputs,
    fake_gpu,
    placement,
)
from harness.graphs import graph

SCALE = reference.VAE_SCALING["sdxl"]  # the tiny graph's Σ DiT works in the SDXL latent space
ADAPTER, OTHER, ZERO = "tiny-sigma-controlnet.safetensors", "tiny-sigma-controlnet-b.safetensors", "tiny-zero.safetensors"


@pytest.fixture(scope="module")
def files(comfy_base, comfy, tiny_models):
    """ControlNets for the tiny Σ DiT (2 blocks: room for one control block) in models/controlnet, wrong files
    beside them, and control images in input/. Returns the adapters' state dicts."""
    import folder_paths

    folder = comfy_base / "models" / "controlnet"
    dit = tiny_models["dit"]
    sds = {name: cfiles.adapter_state_dict(dit, 1, seed=seed, noise=0.2, zero_after=name == ZERO)
           for name, seed in ((ADAPTER, 1), (OTHER, 2), (ZERO, 3))}
    for name, sd in sds.items():
        cfiles.write_adapter_file(folder / name, sd)
    cfiles.write_adapter_folder(folder / "tiny-adapter-folder", sds[OTHER], style="research")
    # wrong files
    from safetensors.torch import save_file

    save_file(dit.state_dict(), str(folder / "tiny-pixart-dit.safetensors"))  # a base DiT, no control blocks
    alpha = tiny.make_dit(variant="alpha-1024")
    torch.save({"state_dict": {f"base_model.{k}": v for k, v in tiny.dit_to_original(alpha.state_dict()).items()}},
               str(folder / "base-only-checkpoint.pth"))  # the authors' layout without its controlnet.* part
    save_file(cfiles.unet_controlnet_state_dict(), str(folder / "control_v11p_sd15_canny.safetensors"))
    good = (folder / ADAPTER).read_bytes()
    (folder / "truncated-controlnet.safetensors").write_bytes(good[: len(good) // 2])
    from diffusers import PixArtTransformer2DModel

    wide = PixArtTransformer2DModel(**{**tiny.dit_config(), "num_attention_heads": 3})  # 216 wide, not 144
    cfiles.write_adapter_file(folder / "other-width-controlnet.safetensors", cfiles.adapter_state_dict(wide, 1))
    cfiles.write_authors_checkpoint(folder / "PixArt-XL-2-1024-ControlNet.pth", alpha,
                                    cfiles.adapter_state_dict(alpha, 1, seed=4))
    rng = np.random.default_rng(5)
    for name, side in (("control_a.png", 64), ("control_b.png", 64), ("control_96.png", 96)):
        edges = (rng.random((side, side)) > 0.8).astype(np.uint8) * 255  # a sparse edge map, as Canny/HED give
        Image.fromarray(np.stack([edges] * 3, -1)).save(f"{folder_paths.get_input_directory()}/{name}")
    return sds


def _image(comfy, name: str) -> torch.Tensor:
    """The control image as Load Image gives it: [1, H, W, 3] in 0..1."""
    import folder_paths

    rgb = Image.open(f"{folder_paths.get_input_directory()}/{name}").convert("RGB")
    return torch.from_numpy(np.asarray(rgb).astype(np.float32) / 255.0)[None]


@torch.no_grad()
def _hint(vae, image: torch.Tensor) -> torch.Tensor:
    """The reference app's hint (PixArt-alpha app/app_controlnet.py): [-1, 1], VAE encode, times the scale factor
    (the posterior mean where the app draws a sample: the pack's deterministic choice)."""
    return vae.encode(image.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode() * SCALE


def _apply(p: dict, node: str, source: list, controlnet: str, image: str, strength=1.0, start=0.0, end=1.0) -> list:
    """A ControlNet Loader + Load Image + Apply on the DiT from `source`; returns the Apply's output link."""
    p[f"{node}0"] = {"class_type": "PixArtSigmaControlNetLoader", "inputs": {"controlnet_name": controlnet,
                                                                             "dtype": "fp32"}}
    p[f"{node}1"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    p[f"{node}2"] = {"class_type": "PixArtSigmaControlNetApply",
                     "inputs": {"dit": source, "controlnet": [f"{node}0", 0], "image": [f"{node}1", 0],
                                "vae": ["5", 0], "strength": strength, "start_percent": start, "end_percent": end}}
    return [f"{node}2", 0]


def _latents(result, comfy_base, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    info = result["outputs"][node]["latents"][0]
    return load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


def _save(p: dict, node: str, source: str, prefix: str) -> None:
    p[node] = {"class_type": "SaveLatent", "inputs": {"samples": [source, 0], "filename_prefix": prefix}}


def _reference_latents(comfy, tiny_models, refs, hints, seed: int, steps: int, prompt: str) -> torch.Tensor:
    """diffusers' PixArtSigmaPipeline on the same tiny models (the T5 rounded to fp16 as the file holds it), every
    transformer forward under the published control order."""
    from pathlib import Path

    from diffusers import PixArtSigmaPipeline

    from pixart_core import sampling
    from pixart_core import t5 as ct5

    t5 = tiny.make_t5()
    t5.load_state_dict({k: v.half().float() for k, v in t5.state_dict().items()})
    tokenizer = ct5.load_tokenizer([Path(comfy.__file__).parent / "comfy" / "text_encoders" / "t5_tokenizer"])
    noise, gen = sampling.initial_noise(seed, 1, 4, 64, 64)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=tiny_models["vae"],
                               transformer=tiny_models["dit"], scheduler=reference.scheduler("dpmpp_2m"))
    with controlled(tiny_models["dit"], refs, hints):
        return pipe(prompt=prompt, negative_prompt="", latents=noise, generator=gen, num_inference_steps=steps,
                    guidance_scale=4.5, height=64, width=64, output_type="latent", use_resolution_binning=False,
                    clean_caption=False).images


@pytest.mark.parametrize("chained", [False, True], ids=["one", "two_chained"])
def test_controlled_sample_equals_the_published_composition(executor, comfy, comfy_base, tiny_models, files,
                                                             chained):
    prompt = "a red fox in the snow"
    p = graph(seed=31, steps=3, positive=prompt, save_latent=True, prefix=f"cn_{chained}")
    dit = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png", strength=0.7)
    specs = [(ADAPTER, "control_a.png", 0.7)]
    if chained:
        dit = _apply(p, "3", dit, OTHER, "control_b.png", strength=1.3)
        specs.append((OTHER, "control_b.png", 1.3))
    p["4"]["inputs"]["dit"] = dit
    p["9"] = {"class_type": "PixArtSigmaSampler", "inputs": {**p["4"]["inputs"], "dit": ["3", 0]}}
    _save(p, "10", "9", f"cn_plain_{chained}")
    r = executor.run(p)
    assert r["ok"], r["error"]
    ours, plain = _latents(r, comfy_base, "8") * SCALE, _latents(r, comfy_base, "10") * SCALE
    refs = [ReferenceAdapter(tiny_models["dit"], files[name], 1, strength) for name, _, strength in specs]
    hints = [_hint(tiny_models["vae"], _image(comfy, image)) for _, image, _ in specs]
    ref = _reference_latents(comfy, tiny_models, refs, hints, 31, 3, prompt)
    # as tests/test_nodes.py: the pipeline pads the prompt to 300 masked tokens, the graph encodes the real ones only
    tolerance = 1e-4 * max(1.0, ref.abs().max().item())
    assert (ours - ref).abs().max() <= tolerance
    assert (plain - ref).abs().max() > 100 * tolerance  # the control changes the result


def test_zero_strength_and_zero_after_proj_give_the_uncontrolled_latents(executor, comfy_base, files):
    p = graph(seed=32, steps=3, save_latent=True, prefix="cn_base")
    for node, (controlnet, strength) in (("9", (ADAPTER, 0.0)), ("11", (ZERO, 1.0))):
        dit = _apply(p, node, ["3", 0], controlnet, "control_a.png", strength=strength)
        p[node] = {"class_type": "PixArtSigmaSampler", "inputs": {**p["4"]["inputs"], "dit": dit}}
        _save(p, f"{node}9", node, f"cn_zero_{node}")
    r = executor.run(p)
    assert r["ok"], r["error"]
    base = _latents(r, comfy_base, "8")
    assert torch.equal(_latents(r, comfy_base, "99"), base)
    assert torch.equal(_latents(r, comfy_base, "119"), base)


class _Forwards:
    """Records, in order, each DiT forward (its AdaLayerNormSingle runs once per forward) and each control block
    that ran, through a global forward hook: which forwards the ControlNet took part in."""

    def __init__(self):
        self.events: list[str] = []

    def __enter__(self):
        def hook(module, args):
            name = type(module).__name__
            if name in ("AdaLayerNormSingle", "ControlBlock"):
                self.events.append(name)

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def controlled(self) -> list[int]:
        """The 0-based forwards (sampling steps: one forward per step here) in which a control block ran."""
        forwards, out = -1, []
        for e in self.events:
            if e == "AdaLayerNormSingle":
                forwards += 1
            elif forwards not in out:
                out.append(forwards)
        assert forwards >= 0
        return out


# (how the sampler runs, the first step of the schedule it runs): the range is a fraction of the WHOLE schedule
RANGE_CASES = {
    "txt2img": ({}, 0),
    # img2img at denoise 0.5 runs the last int(10 * 0.5) = 5 of 10 steps (diffusers' strength): steps 5..9
    "img2img": ({"denoise": 0.5, "latent": ["40", 0]}, 5),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
@pytest.mark.parametrize("start,end,steps", [(0.2, 0.5, [2, 3, 4]), (0.5, 0.8, [5, 6, 7]), (0.0, 1.0, list(range(10)))])
def test_range_acts_on_exactly_the_named_steps(executor, files, case, start, end, steps):
    settings, first = RANGE_CASES[case]
    p = graph(seed=33 + int(start * 10) + 10 * int(end * 10), steps=10)
    p["40"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["401", 0]}}
    p["401"] = {"class_type": "LoadImage", "inputs": {"image": "control_b.png"}}
    p["4"]["inputs"].update(settings, dit=_apply(p, "2", ["3", 0], ADAPTER, "control_a.png", start=start, end=end))
    with _Forwards() as seen:
        r = executor.run(p)
    assert r["ok"], r["error"]
    assert [first + i for i in seen.controlled()] == [s for s in steps if s >= first]


def test_advanced_stage_counts_the_range_in_the_whole_schedule(executor, files):
    """A stage that starts at step 4 of 10 runs steps 4..9; the range 0.2 to 0.5 acts on steps 4 (of 2, 3, 4)."""
    p = graph(seed=35, steps=10)
    p["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    dit = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png", start=0.2, end=0.5)
    p["4"] = _advanced(dit, ["40", 0], start_step=4, steps=10)
    with _Forwards() as seen:
        r = executor.run(p)
    assert r["ok"], r["error"]
    assert [4 + i for i in seen.controlled()] == [4]


ADVANCED = dict(add_noise="enable", seed=37, steps=4, cfg=4.5, scheduler="dpm++ 2m", start_step=0, end_step=10000,
                return_with_leftover_noise="disable", pag_scale=0.0, pag_layers="blocks.1", guidance_rescale=0.0,
                cfg_start=0.0, cfg_end=1.0, dmd_timestep=400)


def _advanced(dit, latent, **inputs):
    return {"class_type": "PixArtSigmaSamplerAdvanced",
            "inputs": {"dit": dit, "positive": ["2", 0], "negative": ["2", 1], "latent": latent,
                       **ADVANCED, **inputs}}


def test_two_advanced_stages_with_control_equal_one_run(executor, comfy_base, files):
    """The range 0.25 to 0.75 of 4 steps is steps 1 and 2: stage 1 (steps 0, 1) and stage 2 (steps 2, 3) each run
    their part of it, and the two stages give the one run's latents exactly."""
    p = graph(seed=37, steps=4, save_latent=True, prefix="cn_one_run")
    dit = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png", start=0.25, end=0.75)
    p["4"]["inputs"]["dit"] = dit
    p["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["41"] = _advanced(dit, ["40", 0], end_step=2, return_with_leftover_noise="enable")
    p["42"] = _advanced(dit, ["41", 0], add_noise="disable", start_step=2)
    _save(p, "43", "42", "cn_two_stages")
    p["44"] = {"class_type": "PixArtSigmaSampler", "inputs": {**p["4"]["inputs"], "dit": ["3", 0]}}
    _save(p, "45", "44", "cn_stages_plain")
    r = executor.run(p)
    assert r["ok"], r["error"]
    one, two, plain = (_latents(r, comfy_base, n) for n in ("8", "43", "45"))
    assert torch.equal(one, two)
    assert (one - plain).abs().max() > 1e-3  # the control acted in both stages' runs


def test_pag_and_inpainting_mask_run_with_control(executor, comfy_base, files):
    p = graph(seed=38, steps=3)
    dit = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png")
    p["40"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    for node, d in (("41", dit), ("43", ["3", 0])):
        p[node] = _advanced(d, ["40", 0], pag_scale=2.0, steps=3)
        _save(p, f"{node}9", node, f"cn_pag_{node}")
    # inpainting: repaint the middle 32 px square (latent 2:6), keep the rest of the image
    p["50"] = {"class_type": "LoadImage", "inputs": {"image": "control_b.png"}}
    p["51"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["50", 0]}}
    p["52"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    p["53"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    p["54"] = {"class_type": "MaskComposite", "inputs": {"destination": ["52", 0], "source": ["53", 0], "x": 16,
                                                         "y": 16, "operation": "add"}}
    for node, d in (("55", dit), ("57", ["3", 0])):
        p[node] = {"class_type": "PixArtSigmaSampler", "inputs": {**p["4"]["inputs"], "dit": d, "latent": ["51", 0],
                                                                  "mask": ["54", 0]}}
        _save(p, f"{node}9", node, f"cn_inpaint_{node}")
    _save(p, "599", "51", "cn_inpaint_source")
    r = executor.run(p)
    assert r["ok"], r["error"]
    pag, pag_plain = _latents(r, comfy_base, "419"), _latents(r, comfy_base, "439")
    assert (pag - pag_plain).abs().max() > 1e-3
    inpaint, inpaint_plain, source = (_latents(r, comfy_base, n) for n in ("559", "579", "599"))
    assert (inpaint[..., 2:6, 2:6] - inpaint_plain[..., 2:6, 2:6]).abs().max() > 1e-3
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[1:7, 1:7] = False  # the bilinear mask's edge: only far from the square is the image kept exactly
    assert torch.allclose(inpaint[..., keep], source[..., keep], rtol=1e-6, atol=1e-7)


def test_tiled_refine_gives_each_tile_its_crop_of_the_hint(executor, comfy, tiny_models, files):
    """96x96 px (12x12 latent) in 64 px tiles overlapping by at least 32 px: tiles start at 0 and 4 in each
    direction (2 per side: ceil((12 - 4) / (8 - 4)) = 2, spread evenly over 12 - 8 = 4), 8x8 latent pixels each. The
    DiT's patch embedding sees each tile's hint (batch 1; the latents come in the CFG batch of 2): the tile's crop
    of the hint of the whole 96x96 control image, tile by tile, row by row, at each step."""
    p = graph(seed=39, steps=4)
    p["40"] = {"class_type": "LoadImage", "inputs": {"image": "control_96.png"}}
    p["41"] = {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["5", 0], "image": ["40", 0]}}
    dit = _apply(p, "2", ["3", 0], ADAPTER, "control_96.png")
    p["4"] = {"class_type": "PixArtSigmaTiledRefine",
              "inputs": {"dit": dit, "positive": ["2", 0], "negative": ["2", 1], "latent": ["41", 0], "seed": 39,
                         "steps": 4, "cfg": 4.5, "scheduler": "dpm++ 2m", "denoise": 0.5, "tile_width": 64,
                         "tile_height": 64, "overlap": 32}}
    seen = []

    def hook(module, args):
        if type(module).__name__ == "PatchEmbed" and args[0].shape[0] == 1:
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        r = executor.run(p)
    finally:
        handle.remove()
    assert r["ok"], r["error"]
    whole = _hint(tiny_models["vae"], _image(comfy, "control_96.png"))
    crops = [whole[..., y:y + 8, x:x + 8] for y in (0, 4) for x in (0, 4)]
    assert len(seen) == 2 * 4  # int(4 * 0.5) = 2 steps of 4 tiles
    for i, got in enumerate(seen):
        assert torch.equal(got, crops[i % 4]), f"tile {i % 4} of step {i // 4}"


def test_sampler_loads_the_adapter_with_the_dit_in_one_call(executor, files, monkeypatch):
    """As ComfyUI's samplers load a model with its ControlNets: one load_models_gpu call with both."""
    import comfy.model_management as mm

    calls = []
    real = mm.load_models_gpu

    def recording(models, *args, **kwargs):
        calls.append(sorted(type(m.model.inner).__name__ for m in models if hasattr(m.model, "inner")))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", recording)
    p = graph(seed=40, steps=2)
    p["4"]["inputs"]["dit"] = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png")
    r = executor.run(p)
    assert r["ok"], r["error"]
    assert ["ControlNetAdapter", "PixArtTransformer2DModel"] in calls, calls


# --- wrong inputs: a clear error naming the file, and the next prompt runs ------------------------------------------

def _refused(executor, prompt: dict, *fragments: str) -> dict:
    """The prompt fails naming `fragments`; then a good controlled prompt runs. Returns the failed run's error."""
    r = executor.run(prompt)
    assert not r["ok"], "the bad prompt ran"
    text = r["error"]["exception_message"]  # the message itself (the error also lists the node's inputs)
    for f in fragments:
        assert f in text, f"{f!r} not in: {text[:800]}"
    good = graph(seed=next(_SEEDS), steps=2)
    good["4"]["inputs"]["dit"] = _apply(good, "2", ["3", 0], ADAPTER, "control_a.png")
    after = executor.run(good)
    assert after["ok"], after["error"]
    return r["error"]


_SEEDS = iter(range(4100, 4200))
NOT_CONTROLNET = "this is not a PixArt ControlNet"
WRONG_FILES = [
    ("tiny-pixart-dit.safetensors", [NOT_CONTROLNET, "a PixArt transformer", "load it with the PixArt DiT loader"]),
    ("base-only-checkpoint.pth", [NOT_CONTROLNET, "a PixArt transformer in the original key layout"]),
    ("control_v11p_sd15_canny.safetensors", [NOT_CONTROLNET, "a Stable Diffusion 1.x/2.x ControlNet (for a UNet)"]),
    ("truncated-controlnet.safetensors", ["truncated", "Download it again"]),
]


@pytest.mark.parametrize("name,fragments", WRONG_FILES, ids=[c[0] for c in WRONG_FILES])
def test_wrong_controlnet_file_is_a_clear_error(executor, files, name, fragments):
    p = graph(seed=next(_SEEDS), steps=2)
    p["4"]["inputs"]["dit"] = _apply(p, "2", ["3", 0], name, "control_a.png")
    _refused(executor, p, name, *fragments)


WRONG_MODEL = [
    ("other-width-controlnet.safetensors", ["216 wide", "the DiT is 144 wide", "it belongs to another PixArt model"]),
    ("PixArt-XL-2-1024-ControlNet.pth", ["trained with PixArt alpha-1024", "loaded as sigma-1024",
                                         "PixArt-XL-2-1024-MS.pth"]),
]


@pytest.mark.parametrize("name,fragments", WRONG_MODEL, ids=[c[0] for c in WRONG_MODEL])
def test_controlnet_of_another_model_is_refused_at_apply(executor, files, name, fragments):
    p = graph(seed=next(_SEEDS), steps=2)
    p["4"]["inputs"]["dit"] = _apply(p, "2", ["3", 0], name, "control_a.png")
    error = _refused(executor, p, name, *fragments)
    assert error["node_type"] == "PixArtSigmaControlNetApply", error


def test_adapter_folder_loads_like_its_file(executor, comfy_base, files):
    p = graph(seed=42, steps=2, save_latent=True, prefix="cn_file")
    p["4"]["inputs"]["dit"] = _apply(p, "2", ["3", 0], OTHER, "control_a.png")
    p["9"] = {"class_type": "PixArtSigmaSampler",
              "inputs": {**p["4"]["inputs"], "dit": _apply(p, "3", ["3", 0], "tiny-adapter-folder", "control_a.png")}}
    _save(p, "10", "9", "cn_folder")
    r = executor.run(p)
    assert r["ok"], r["error"]
    assert torch.equal(_latents(r, comfy_base, "8"), _latents(r, comfy_base, "10"))


def test_dit_to_model_refuses_a_controlled_dit_and_says_what_to_do(executor, files):
    p = graph(seed=43, steps=2)
    twice = _apply(p, "3", _apply(p, "2", ["3", 0], ADAPTER, "control_a.png"), ADAPTER, "control_a.png")
    p["9"] = {"class_type": "PixArtSigmaDiTToModel", "inputs": {"dit": twice}}
    p["10"] = {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 0]}}
    p["11"] = {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 1]}}
    p["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["4"] = {"class_type": "KSampler", "inputs": {"model": ["9", 0], "positive": ["10", 0], "negative": ["11", 0],
                                                   "latent_image": ["12", 0], "seed": 43, "steps": 2, "cfg": 4.5,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    error = _refused(executor, p, ADAPTER)
    assert error["exception_message"].rstrip("\n") == (  # ComfyUI ends the message with a newline
        f"PixArt-Σ DiT → MODEL: this DiT has ControlNets applied ({ADAPTER}, {ADAPTER}), which ComfyUI's samplers "
        "cannot run: "
        "ComfyUI's PixArt model has no ControlNet hook. Sample the controlled DiT with PixArt-Σ Sampler or PixArt-Σ "
        "Sampler (Advanced) (Tiled Refine for tiles), or connect DiT → MODEL to the DiT before PixArt-Σ ControlNet "
        "Apply.")


def test_vae_of_the_other_latent_space_is_refused_at_apply(executor, files, comfy_base, tiny_models):
    from safetensors.torch import save_file

    save_file(tiny.vae_to_ldm(tiny.make_vae(family="sd").state_dict()), str(comfy_base / "models" / "vae" /
                                                                          "tiny_sd15_vae-ft-mse.safetensors"))
    p = graph(seed=next(_SEEDS), steps=2)
    p["4"]["inputs"]["dit"] = _apply(p, "2", ["3", 0], ADAPTER, "control_a.png")
    p["23"] = {"class_type": "PixArtSigmaVAELoader", "inputs": {"vae_name": "tiny_sd15_vae-ft-mse.safetensors",
                                                               "dtype": "fp32"}}
    p["22"]["inputs"]["vae"] = ["23", 0]
    _refused(executor, p, "tiny_sd15_vae-ft-mse.safetensors", "works in the SDXL latent space",
             "the SDXL VAE (PixArt-Σ)")


# --- memory: ComfyUI's model management on a simulated GPU (the meta device, as tests/test_gpu_readiness.py) ---------

def test_adapter_is_loaded_partially_and_offloaded_by_comfyui(comfy, tmp_path):
    """A fake GPU with room for about half of the DiT and its ControlNet: ComfyUI loads both in one call, part of
    them streams per forward (cast-weights layers), the controlled forward runs on the device; when another model
    needs the GPU, ComfyUI unloads the ControlNet too."""
    import comfy.model_management as mm

    from pixart_core import controlnet as cn
    from pixart_core import controlnet_files as cnf

    management = pack("nodes.comfy.loading")
    dit = tiny.make_dit()
    path = cfiles.write_adapter_file(tmp_path / "a.safetensors", cfiles.adapter_state_dict(dit, 1, seed=6))
    dit_patcher = management.wrap(dit, META, META)
    adapter_patcher = management.wrap(cnf.load_controlnet(path)[0], META, META)
    total = budget_for_partial(dit_patcher.model_size() + adapter_patcher.model_size())
    with fake_gpu(mm.VRAMState.NORMAL_VRAM, total):
        loaded = management.use_together([dit_patcher, adapter_patcher])
        assert [ready.device for ready in loaded] == [META, META]
        streamed = 0
        for ready in loaded:
            devices, n = placement(ready.model)
            assert devices == {"meta"}, devices
            streamed += n
        assert streamed > 0, "nothing streams: not a partial load"
        model = cn.ControlledDiT(loaded[0].model, [cn.Control(loaded[1].model, torch.zeros(1, 4, 8, 8))])
        assert model(**dit_inputs(dit, META))[0].device == META
        assert _held(mm, adapter_patcher) and _held(mm, dit_patcher)
        big = management.wrap(torch.nn.Linear(16384, 16384, device="meta"), META, META)  # 1 GiB, more than the GPU
        management.use(big)
        assert not _held(mm, adapter_patcher) and not _held(mm, dit_patcher), "ComfyUI kept them loaded"


def _held(mm, patcher) -> bool:
    """Whether ComfyUI's model management holds the model loaded on the fake GPU."""
    return any(m.model is patcher and m.device.type == "meta" for m in mm.current_loaded_models)


@torch.no_grad()
def test_partially_loaded_adapter_gives_the_whole_adapters_output(comfy, tmp_path):
    """ComfyUI's partial (lowvram) load of the ControlNet streams its layers per forward: the same output."""

    from pixart_core import controlnet as cn
    from pixart_core import controlnet_files as cnf

    management = pack("nodes.comfy.loading")
    dit = tiny.make_dit()
    path = cfiles.write_adapter_file(tmp_path / "a.safetensors", cfiles.adapter_state_dict(dit, 1, seed=7))
    hint = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = dit_inputs(dit, CPU)
    whole = cn.ControlledDiT(dit, [cn.Control(cnf.load_controlnet(path)[0], hint)])(**inputs)[0]
    patcher = management.wrap(cnf.load_controlnet(path)[0], CPU, CPU)
    patcher.patch_model(device_to=CPU, lowvram_model_memory=patcher.model_size() // 2)
    try:
        assert sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False)) > 0
        partial = cn.ControlledDiT(dit, [cn.Control(patcher.model.inner, hint)])(**inputs)[0]
    finally:
        patcher.unpatch_model(CPU)
    assert torch.equal(whole, partial)
    assert (whole - dit(**inputs)[0]).abs().max() > 1e-4  # the control acts


# --- the nodes' own outputs: what the loader loaded, what Apply says, dtype and devices ------------------------------

VAE_NAME = "tiny_sdxl_vae.safetensors"  # the tiny graph's VAE


def _loaded(comfy, name: str, dtype: str = "fp32"):
    return comfy.NODE_CLASS_MAPPINGS["PixArtSigmaControlNetLoader"].execute(controlnet_name=name, dtype=dtype)


@pytest.mark.parametrize("name,text", [
    (ADAPTER, f"{ADAPTER}: adapter layout, 1 control blocks, 144 wide"),
    ("PixArt-XL-2-1024-ControlNet.pth", "PixArt-XL-2-1024-ControlNet.pth: the authors' checkpoint (original layout), 1 "
                                        "control blocks, 144 wide, trained with PixArt alpha-1024"),
])
def test_controlnet_loader_says_what_it_loaded(comfy, files, name, text):
    """The Loader's text in the UI: the file, what it was, its control blocks and width (the tiny DiT's 144:
    2 heads x 72), and the DiT it was trained with where the file says (the authors' checkpoints do)."""
    out = _loaded(comfy, name)
    assert out.ui.as_dict() == {"text": (text,)}
    assert out.result[0].layout in text


@pytest.mark.parametrize("native", [True, False], ids=["cpu-native-bf16", "cpu-without-bf16"])
def test_controlnet_loader_auto_dtype_and_devices_are_the_dit_loaders(comfy, files, monkeypatch, native):
    """dtype 'auto' gives the ControlNet the DiT Loader's dtype on this device (bf16 where the CPU computes bf16
    natively, else fp32: ComfyUI 0.3.75's rule, by hand in test_gpu_readiness' table); a set dtype is kept; the
    patcher loads on ComfyUI's torch device and offloads to its UNet offload device, as the DiT's does."""
    import sys

    import comfy.model_management as mm

    dtypes = sys.modules[pack("nodes.comfy.devices").dtypes.__name__]
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda *a: {"avx512f"} | ({"avx512_bf16"} if native else set()))
    monkeypatch.setattr(dtypes.sys, "platform", "linux")
    dtypes.cpu_native_bf16.cache_clear()
    try:
        auto = _loaded(comfy, ADAPTER, "auto").result[0]
    finally:
        dtypes.cpu_native_bf16.cache_clear()
    assert auto.patcher.model.inner.parameters().__next__().dtype == (torch.bfloat16 if native else torch.float32)
    assert _loaded(comfy, ADAPTER, "bf16").result[0].patcher.model.inner.parameters().__next__().dtype == torch.bfloat16
    assert (auto.patcher.load_device, auto.patcher.offload_device) == (mm.get_torch_device(), mm.unet_offload_device())


@pytest.mark.parametrize("strength,start,end,acts", [(1.0, 0.5, 0.5, False), (0.0, 0.0, 1.0, False),
                                                     (1.0, 0.2, 0.5, True)])
def test_controlnet_apply_says_what_it_applied_and_warns_when_it_acts_on_no_step(comfy, files, caplog, strength,
                                                                                  start, end, acts):
    """Apply's UI text (the ControlNet on the DiT, strength and range, how many are applied); an empty range (start
    equal to end, allowed: ComfyUI's ControlNetApplyAdvanced allows it too) or strength 0 is applied with a warning
    that it acts on no step."""
    import logging

    from harness.graphs import DIT_FILE

    dit = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaDiTLoader"].execute(dit_name=DIT_FILE, variant="auto",
                                                                     dtype="fp32").result[0]
    vae = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaVAELoader"].execute(vae_name=VAE_NAME, dtype="fp32").result[0]
    caplog.set_level(logging.INFO)
    out = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaControlNetApply"].execute(
        dit=dit, controlnet=_loaded(comfy, ADAPTER).result[0], image=torch.rand(1, 64, 64, 3), vae=vae,
        strength=strength, start_percent=start, end_percent=end)
    assert out.ui.as_dict() == {"text": (f"{ADAPTER} on {DIT_FILE}: strength {strength:g} from {start:g} to {end:g} "
                                         "of the schedule; 1 ControlNet(s) applied",)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([] if acts else [f"PixArt ControlNet {ADAPTER}: strength {strength:g}, from {start:g} to "
                                         f"{end:g} of the schedule: it acts on no step."])
    assert len(out.result[0].controls) == 1

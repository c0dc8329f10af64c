"""The nodes inside a real ComfyUI (in this process): its prompt validation, executor, caches and model management."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from harness import models as tiny
from harness.graphs import PIPE, graph
from harness.graphs import saved_images as _saved_images


def _loaded_models(comfy):
    import comfy.model_management as mm

    return [type(m.model.model.inner).__name__ for m in mm.current_loaded_models if m.model is not None
            and hasattr(m.model.model, "inner")]


def test_nodes_registered_with_tooltips_and_categories(comfy):
    from conftest import NODE_IDS

    for node_id in NODE_IDS:
        info = comfy.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["category"].startswith("PixArt-Σ") and info["display_name"].startswith("PixArt-Σ")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_full_graph_makes_an_image_and_matches_diffusers(executor, comfy, comfy_base, tiny_models, tokenizer):
    from diffusers import PixArtSigmaPipeline

    import reference_settings as reference
    from pixart_core import sampling

    prompt = "A Red Fox in the SNOW... see <b>https://example.com/fox</b> #fox"
    result = executor.run(graph(save_latent=True, batch=2, positive=prompt))
    assert result["ok"], result["error"]
    images = _saved_images(result, comfy_base)
    assert len(images) == 2 and images[0].shape == (64, 64, 3) and images[0].std() > 1.0
    assert not np.array_equal(images[0], images[1])  # one generator for the batch: different noise per image

    latent_info = result["outputs"]["8"]["latents"][0]
    saved = load_file(str(comfy_base / "output" / latent_info["subfolder"] / latent_info["filename"]))
    ours = saved["latent_tensor"] * reference.VAE_SCALING["sdxl"]  # ComfyUI LATENTs are raw; diffusers returns scaled

    # The reference: diffusers' pipeline, encoding the same prompt with the fp16-rounded T5 of the file.
    t5 = tiny.make_t5()
    t5.load_state_dict({k: v.half().float() for k, v in t5.state_dict().items()})
    noise, gen = sampling.initial_noise(7, 2, 4, 64, 64)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=tiny_models["vae"],
                               transformer=tiny_models["dit"], scheduler=reference.scheduler("dpmpp_2m"))
    ref = pipe(prompt=prompt, negative_prompt="", num_images_per_prompt=2, latents=noise,
               generator=gen, num_inference_steps=3, guidance_scale=4.5, height=64, width=64, output_type="latent",
               use_resolution_binning=False, clean_caption=True).images  # diffusers' default: caption cleaning
    # The pipeline pads prompts to 300 tokens; we encode only the real ones (exact under the mask), so the
    # two differ by fp32 summation order only: 1e-4 relative to the latents' scale (random tiny weights make
    # them large here; core/test_sampling_parity.py checks 1e-4 absolute on identical embeddings).
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def _saved_latent(result, comfy_base: Path):
    info = result["outputs"]["8"]["latents"][0]
    return load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


def test_diffusers_folder_matches_the_folders_diffusers_pipeline(executor, comfy_base):
    """T5, DiT and VAE all from one diffusers folder: the same latents and image as diffusers' PixArtSigmaPipeline
    built from that folder's components (its default caption cleaning on, a prompt that needs it)."""
    import torch
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    import reference_settings as reference

    prompt = "A Red Fox (in the SNOW), photo from https://example.com/fox -- @someone"
    result = executor.run(graph(t5=PIPE, dit=PIPE, vae=PIPE, prefix="folder", save_latent=True, positive=prompt,
                                seed=21))
    assert result["ok"], result["error"]
    folder = comfy_base / "models" / "diffusers" / PIPE
    pipe = PixArtSigmaPipeline(tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                               text_encoder=T5EncoderModel.from_pretrained(folder / "text_encoder"),
                               transformer=PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer"),
                               vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                               scheduler=reference.scheduler("dpmpp_2m"))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(21))  # ComfyUI's seed convention
    ref = pipe(prompt=prompt, negative_prompt="", latents=noise, num_inference_steps=3, guidance_scale=4.5,
               height=64, width=64, output_type="latent", use_resolution_binning=False).images
    scale = pipe.vae.config.scaling_factor
    ours = _saved_latent(result, comfy_base) * scale
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    with torch.no_grad():
        ref_image = (pipe.vae.decode(ref / scale).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(_saved_images(result, comfy_base)[0].astype(np.float32) - ref_image).max() <= 2.0


@pytest.mark.parametrize("quant,min_cos", [("8-bit (bitsandbytes)", 0.99), ("4-bit nf4 (bitsandbytes)", 0.95)])
def test_quantized_t5_latents_follow_the_unquantized_t5(executor, comfy_base, quant, min_cos):
    """The quantized T5 path changes the numbers (it really quantized) but keeps the result close to the same
    folder's T5 in fp32 (whose run matches diffusers, above)."""
    import torch

    runs = {}
    for q in ("none", quant):
        result = executor.run(graph(t5=PIPE, quant=q, dit=PIPE, vae=PIPE, prefix="quant", save_latent=True, seed=8))
        assert result["ok"], result["error"]
        runs[q] = _saved_latent(result, comfy_base).flatten()
    cos = torch.nn.functional.cosine_similarity(runs["none"], runs[quant], dim=0)
    assert not torch.equal(runs["none"], runs[quant])
    assert cos >= min_cos, float(cos)


def test_seed_change_reuses_loaded_models_and_cached_encoding(executor, comfy):
    import comfy.model_management as mm

    assert executor.run(graph(seed=11))["ok"]
    result = executor.run(graph(seed=12))
    assert result["ok"], result["error"]
    cached = next(d["nodes"] for e, d in result["messages"] if e == "execution_cached")
    assert {"1", "2", "3", "5"} <= set(cached)  # the T5 did not run again for a seed-only change
    ours = [m for m in mm.current_loaded_models if hasattr(m.model.model, "inner")]
    ids = [id(m.model) for m in ours]
    assert len(ids) == len(set(ids)), "a model is loaded twice"


def test_size_not_divisible_by_16_names_valid_sizes(executor):
    result = executor.run(graph(width=1000))
    assert not result["ok"]
    msg = result["error"]["exception_message"]
    assert "width 1000 is not a multiple of 16" in msg and "992 or 1008" in msg
    assert executor.run(graph(seed=3))["ok"]  # the next good prompt still runs


def test_wrong_file_in_dit_loader_says_what_it_is(executor, comfy_base):
    vae_sd = tiny.vae_to_ldm(tiny.make_vae().state_dict())
    save_file(vae_sd, str(comfy_base / "models" / "checkpoints" / "sdxl_vae_copy.safetensors"))
    result = executor.run(graph(dit="sdxl_vae_copy.safetensors"))
    assert not result["ok"]
    msg = result["error"]["exception_message"]
    assert "sdxl_vae_copy.safetensors" in msg and "not a PixArt transformer" in msg and "a VAE" in msg
    assert executor.run(graph(seed=4))["ok"]


def test_interrupt_during_sampling_then_next_run_works(executor, comfy):
    import comfy.model_management as mm
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        result = executor.run(graph(seed=99, steps=5))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not result["ok"]
    assert any(e == "execution_interrupted" for e, _ in result["messages"])
    assert calls[:2] == [1, 2] and 5 not in calls
    after = executor.run(graph(seed=99, steps=5))
    assert after["ok"], after["error"]

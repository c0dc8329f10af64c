"""Every PixArt file layout x variant loads as the model it is (issue: formats, variants, detection)."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

import reference_settings as reference
from harness import models as tiny
from pixart_core import files
from pixart_core import t5 as ct5
from pixart_core import transformer as cdit

RELEASE_NAMES = {
    "sigma-256": "PixArt-Sigma-XL-2-256x256", "sigma-512": "PixArt-Sigma-XL-2-512-MS",
    "sigma-1024": "PixArt-Sigma-XL-2-1024-MS", "sigma-2k": "PixArt-Sigma-XL-2-2K-MS",
    "alpha-256": "PixArt-XL-2-256x256", "alpha-512": "PixArt-XL-2-512x512", "alpha-1024": "PixArt-XL-2-1024-MS",
}
LAYOUTS = ["original-pth", "original-pth-wrapped", "original-safetensors", "diffusers-single",
           "comfyui-prefixed", "diffusers-folder"]


def _write(tmp_path, layout: str, name: str, model) -> object:
    sd = model.state_dict()
    if layout == "original-pth":
        path = tmp_path / f"{name}.pth"
        torch.save(tiny.dit_to_original(sd), path)
    elif layout == "original-pth-wrapped":
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": tiny.dit_to_original(sd)}, path)
    elif layout == "original-safetensors":
        path = tmp_path / f"{name}.safetensors"
        save_file(tiny.dit_to_original(sd), str(path))
    elif layout == "diffusers-single":
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
    elif layout == "comfyui-prefixed":
        path = tmp_path / f"{name}.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in tiny.dit_to_original(sd).items()}, str(path))
    else:
        path = tmp_path / name
        model.save_pretrained(path / "transformer")
    return path


def _forward(model, micro: bool, h: int = 8, w: int = 12):
    torch.manual_seed(4)
    x, enc = torch.randn(2, 4, h, w), torch.randn(2, 6, tiny.T5_WIDTH)
    mask, t = torch.tensor([[1] * 6, [1, 1, 0, 0, 0, 0]]), torch.tensor([999, 37])
    added = {"resolution": None, "aspect_ratio": None}
    if micro:
        added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]] * 2), "aspect_ratio": torch.tensor([[h / w]] * 2)}
    with torch.no_grad():
        return model(x, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added,
                     return_dict=False)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", list(RELEASE_NAMES))
def test_every_variant_in_every_layout(tmp_path, variant, layout):
    v = reference.VARIANTS[variant]  # the release's settings, not the pack's presets
    ref = tiny.make_dit(sample_size=v["sample_size"], interpolation_scale=v["interpolation_scale"],
                        micro=v["micro_conditioning"])
    path = _write(tmp_path, layout, RELEASE_NAMES[variant], ref)
    model, found, how = cdit.load_dit(path, "auto", torch.float32)
    assert found.name == variant, how
    assert model.config.sample_size == v["sample_size"]
    assert model.pos_embed.interpolation_scale == v["interpolation_scale"]
    assert model.use_additional_conditions == v["micro_conditioning"]
    assert (found.max_tokens, found.vae_scaling_factor) == (v["max_tokens"], v["vae_scaling_factor"])
    assert (_forward(model, v["micro_conditioning"]) - _forward(ref, v["micro_conditioning"])).abs().max() <= 1e-6


def test_manual_override_wins_over_the_name(tmp_path):
    ref = tiny.make_dit(sample_size=256, interpolation_scale=4.0)
    path = _write(tmp_path, "original-pth", "my_finetune", ref)  # the name says nothing
    model, found, how = cdit.load_dit(path, "auto", torch.float32)
    assert found.name == "sigma-1024" and "assumed" in how  # said in the UI, not silently
    model, found, how = cdit.load_dit(path, "sigma-2k", torch.float32)
    assert found.name == "sigma-2k" and model.pos_embed.interpolation_scale == 4.0
    assert (_forward(model, False) - _forward(ref, False)).abs().max() <= 1e-6


def test_variant_from_safetensors_metadata(tmp_path):
    ref = tiny.make_dit(sample_size=256, interpolation_scale=4.0)
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path), metadata={"modelspec.title": "PixArt-Sigma-XL-2-2K-MS"})
    _, found, how = cdit.load_dit(path, "auto", torch.float32)
    assert found.name == "sigma-2k"


def test_depth_42_community_model(tmp_path):
    ref = tiny.make_dit(layers=42)
    path = _write(tmp_path, "original-safetensors", "PixArt-Sigma-900M-1024", ref)
    model, found, _ = cdit.load_dit(path, "auto", torch.float32)
    assert model.config.num_layers == 42 and found.name == "sigma-1024"
    assert (_forward(model, False) - _forward(ref, False)).abs().max() <= 1e-6


def test_distilled_models_say_how_to_sample(tmp_path):
    ref = tiny.make_dit(sample_size=64, interpolation_scale=1.0)
    path = _write(tmp_path, "diffusers-single", "PixArt-Alpha-DMD-XL-2-512x512", ref)
    _, found, how = cdit.load_dit(path, "auto", torch.float32)
    assert found.name == "alpha-512" and "dmd 1-step" in how


def test_full_size_xl2_single_file(tmp_path):
    """One real-size PixArt-Σ XL/2 (0.6B parameters) through the fp16 original-layout file path."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    ref = PixArtTransformer2DModel(sample_size=128, interpolation_scale=2.0, use_additional_conditions=False,
                                   caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                   norm_eps=1e-6, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((p * 0.3).half().float())  # exactly representable in the fp16 file
    path = tmp_path / "PixArt-Sigma-XL-2-1024-MS.safetensors"
    save_file({k: v.half() for k, v in tiny.dit_to_original(ref.state_dict()).items()}, str(path))
    model, found, _ = cdit.load_dit(path, "auto", torch.float32)
    assert found.name == "sigma-1024" and model.config.num_layers == 28 and model.config.num_attention_heads == 16
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    torch.manual_seed(1)
    x, enc = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 4096) * 0.1
    kw = dict(encoder_hidden_states=enc, timestep=torch.tensor([500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        assert (model(x, **kw)[0] - ref(x, **kw)[0]).abs().max() <= 1e-6


def test_t5_sharded_folder(tmp_path):
    t5 = tiny.make_t5()
    t5.save_pretrained(tmp_path / "t5-v1_1-xxl", max_shard_size="500KB")
    assert (tmp_path / "t5-v1_1-xxl" / "model.safetensors.index.json").is_file()
    loaded = ct5.load_t5(tmp_path / "t5-v1_1-xxl", "none", torch.float32)
    ids = torch.tensor([[100, 200, 1]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).last_hidden_state, t5(input_ids=ids).last_hidden_state)


def test_wrong_text_encoders_are_named(tmp_path):
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 2),
               "text_model.embeddings.token_embedding.weight": torch.zeros(49408, 2)}, str(clip))
    with pytest.raises(files.WeightFileError, match="a CLIP text encoder"):
        ct5.load_t5(clip, "none", torch.float32)
    base = tmp_path / "t5_base.safetensors"
    cfg = dict(tiny.T5_CONFIG, vocab_size=32100)
    from transformers import T5Config, T5EncoderModel

    save_file(tiny.t5_single_file_sd(T5EncoderModel(T5Config(**cfg))), str(base))
    with pytest.raises(files.WeightFileError, match="32100-token vocabulary"):
        ct5.load_t5(base, "none", torch.float32)


def test_scaled_fp8_t5_with_scales_missing_is_named(tmp_path):
    """fp8 weights with the scaled_fp8 marker but only one scale: the others' scales are missing (test_t5_formats
    loads complete scaled fp8 files)."""
    sd = tiny.t5_single_file_sd(tiny.make_t5(), dtype=torch.float8_e4m3fn)
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(())
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(files.WeightFileError, match=r"a scaled fp8 file whose per-tensor scales are missing for 13 "):
        ct5.load_t5(path, "none", torch.float32)


def test_t5_of_the_wrong_width_is_named_at_sampling():
    from pixart_core import sampling
    from pixart_core.conditioning import Conditioning

    dit = tiny.make_dit()
    cond = Conditioning(torch.randn(1, 4, 768), torch.ones(1, 4, dtype=torch.long))
    noise, _ = sampling.initial_noise(0, 1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"768 wide \(T5-v1.1-base\).*64-wide"):
        sampling.sample(dit, cond, cond, noise, steps=1, cfg=4.5)


def test_sd_vae_with_a_sigma_model_is_refused(executor, comfy_base):
    from test_nodes import graph

    name = "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(tiny.vae_to_ldm(tiny.make_vae().state_dict()), str(comfy_base / "models" / "vae" / name))
    result = executor.run(graph(vae=name, seed=123))
    assert not result["ok"]
    msg = result["error"]["exception_message"]
    assert "SDXL latent space" in msg and name in msg and "sdxl_vae.safetensors" in msg
    assert executor.run(graph(seed=124))["ok"]  # the next good prompt runs


def test_sdxl_encoded_latent_into_an_alpha_model_is_refused(tmp_path):
    from pixart_core import vae as cvae

    with pytest.raises(ValueError, match="SD latent space"):
        cvae.check_pairing("sd", "sdxl", "sdxl_vae.safetensors")
    cvae.check_pairing("sdxl", None, "my_vae.safetensors")  # unknown family: nothing to refuse

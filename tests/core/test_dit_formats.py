"""Every PixArt DiT file layout x variant loads as the model it is: the variant from the name, the metadata or the
loader's choice, community and distilled models, and the full-size XL/2."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import reference_settings as reference
from harness import models as tiny
from harness.models import DIT_LAYOUTS as LAYOUTS
from harness.models import write_dit as _write
from pixart_core import transformer as cdit

RELEASE_NAMES = {
    "sigma-256": "PixArt-Sigma-XL-2-256x256", "sigma-512": "PixArt-Sigma-XL-2-512-MS",
    "sigma-1024": "PixArt-Sigma-XL-2-1024-MS", "sigma-2k": "PixArt-Sigma-XL-2-2K-MS",
    "alpha-256": "PixArt-XL-2-256x256", "alpha-512": "PixArt-XL-2-512x512", "alpha-1024": "PixArt-XL-2-1024-MS",
}


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


@pytest.mark.slow  # a 0.6B-parameter DiT built, saved and loaded: ~16 s on a 2-core CPU
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

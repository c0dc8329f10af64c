"""The pack's schedulers, presets and loaders against the releases' published settings (tests/reference_settings.py),
field by field. No expected value here comes from the pack."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

import reference_settings as ref
from harness import models as tiny
from pixart_core import schedulers
from pixart_core import transformer as cdit
from pixart_core import vae as cvae
from pixart_core.variants import PRESETS, variant_from_config, variant_from_name

RELEASE_NAMES = {
    "sigma-256": "PixArt-Sigma-XL-2-256x256", "sigma-512": "PixArt-Sigma-XL-2-512-MS",
    "sigma-1024": "PixArt-Sigma-XL-2-1024-MS", "sigma-2k": "PixArt-Sigma-XL-2-2K-MS",
    "alpha-256": "PixArt-XL-2-256x256", "alpha-512": "PixArt-XL-2-512x512", "alpha-1024": "PixArt-XL-2-1024-MS",
}


def _fields(scheduler) -> list[str]:
    """Every setting the scheduler class takes (its __init__ parameters)."""
    params = inspect.signature(type(scheduler).__init__).parameters
    return [p for p in params if p not in ("self", "kwargs")]


def test_every_scheduler_has_a_reference():
    assert set(schedulers.SCHEDULERS) == set(ref.SCHEDULERS)


@pytest.mark.parametrize("name", list(ref.SCHEDULERS))
def test_make_scheduler_matches_the_published_settings(name):
    ours, want = schedulers.make(name), ref.scheduler(name)
    assert type(ours).__name__ == ref.SCHEDULERS[name][0]
    fields = _fields(want)
    assert len(fields) >= 9  # a real comparison, not an empty one
    diff = {f: (ours.config.get(f), want.config.get(f)) for f in fields if ours.config.get(f) != want.config.get(f)}
    assert not diff, f"{name}: (ours, release) differ in {diff}"


def test_dmd_samples_at_the_release_timestep():
    assert [schedulers.DMD_TIMESTEP] == ref.DMD_TIMESTEPS


@pytest.mark.parametrize("name", list(ref.SCHEDULERS))
def test_timesteps_match_the_published_scheduler(name):
    """The schedule actually run (not only the config): 20 steps, or the DMD step."""
    ours, want = schedulers.make(name), ref.scheduler(name)
    kw = {"timesteps": ref.DMD_TIMESTEPS} if name == schedulers.DMD else {"num_inference_steps": 20}
    ours.set_timesteps(**kw)
    want.set_timesteps(**kw)
    assert torch.equal(ours.timesteps, want.timesteps)
    assert torch.allclose(ours.alphas_cumprod, want.alphas_cumprod)


def test_every_preset_has_a_reference():
    assert set(PRESETS) == set(ref.VARIANTS)


@pytest.mark.parametrize("name", list(ref.VARIANTS))
def test_preset_matches_the_release(name):
    v, want = PRESETS[name], ref.VARIANTS[name]
    assert v.name == name
    assert (v.sample_size, v.interpolation_scale, v.max_tokens, v.micro_conditioning) == (
        want["sample_size"], want["interpolation_scale"], want["max_tokens"], want["micro_conditioning"])
    assert v.vae_scaling_factor == want["vae_scaling_factor"]
    assert v.max_tokens == ref.MAX_TOKENS[v.family] and v.vae_scaling_factor == ref.VAE_SCALING[v.vae]
    assert v.resolution == want["sample_size"] * 8
    assert v.family == name.split("-")[0]


@pytest.mark.parametrize("name", list(ref.VARIANTS))
def test_release_names_and_configs_detect_the_variant(name):
    want = ref.VARIANTS[name]
    assert variant_from_name(RELEASE_NAMES[name]).name == name
    config = {"sample_size": want["sample_size"], "use_additional_conditions": want["micro_conditioning"]}
    assert variant_from_config(config, RELEASE_NAMES[name]).name == name


@pytest.mark.parametrize("layout", ["single", "folder"])
@pytest.mark.parametrize("name", list(ref.VARIANTS))
def test_loaded_dit_config_matches_the_release(tmp_path, name, layout):
    """The loader's PixArtTransformer2DModel carries the release's sample size, interpolation and embedders."""
    want = ref.VARIANTS[name]
    model = tiny.make_dit(sample_size=want["sample_size"], interpolation_scale=want["interpolation_scale"],
                          micro=want["micro_conditioning"])
    if layout == "single":
        path = tmp_path / f"{RELEASE_NAMES[name]}.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = tmp_path / RELEASE_NAMES[name]
        model.save_pretrained(path / "transformer")
    loaded, variant, _ = cdit.load_dit(path, "auto", torch.float32)
    assert variant.name == name
    assert loaded.config.sample_size == want["sample_size"]
    assert loaded.pos_embed.interpolation_scale == want["interpolation_scale"]
    assert loaded.use_additional_conditions == want["micro_conditioning"]
    assert loaded.config.caption_channels == tiny.T5_WIDTH and loaded.config.num_layers == 2


@pytest.mark.parametrize("sample_size", [32, 64, 128, 256])
def test_folder_without_interpolation_scale_loads_as_diffusers_does(tmp_path, sample_size):
    """config.json with "interpolation_scale": null: diffusers' own loader decides (max(sample_size // 64, 1))."""
    from diffusers import PixArtTransformer2DModel

    model = tiny.make_dit(sample_size=sample_size, interpolation_scale=1.0)
    folder = tmp_path / "my-pixart"
    model.save_pretrained(folder / "transformer")
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["interpolation_scale"] = None
    cfg_path.write_text(json.dumps(cfg))
    theirs = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    ours, _, _ = cdit.load_dit(folder, "auto", torch.float32)
    assert ours.pos_embed.interpolation_scale == theirs.pos_embed.interpolation_scale
    torch.manual_seed(0)
    x, enc = torch.randn(1, 4, 8, 8), torch.randn(1, 3, tiny.T5_WIDTH)
    kw = dict(encoder_hidden_states=enc, timestep=torch.tensor([500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        assert torch.equal(ours(x, **kw)[0], theirs(x, **kw)[0])


@pytest.mark.parametrize("file_name,family", [("sdxl_vae.safetensors", "sdxl"),
                                               ("vae-ft-mse-840000-ema-pruned.safetensors", "sd")])
def test_loaded_vae_scaling_factor_matches_the_release(tmp_path, file_name, family):
    path = tmp_path / file_name
    save_file(tiny.vae_to_ldm(tiny.make_vae().state_dict()), str(path))
    vae, found = cvae.load_vae(path)
    assert found == family
    assert vae.config.scaling_factor == ref.VAE_SCALING[family]


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_vae_folder_family_comes_from_its_scaling_factor(tmp_path, family):
    vae = tiny.make_vae()
    vae.register_to_config(scaling_factor=ref.VAE_SCALING[family])
    vae.save_pretrained(tmp_path / "some-vae" / "vae")
    loaded, found = cvae.load_vae(tmp_path / "some-vae")
    assert found == family and loaded.config.scaling_factor == ref.VAE_SCALING[family]


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError) as e:
        schedulers.make("heun")
    assert str(e.value) == f"Unknown scheduler 'heun'; choose one of {list(ref.SCHEDULERS)}."


def test_scheduler_table_entry_keeps_each_field_in_its_place():
    """The table's builder (it runs at import, so the table tests above cannot see a fault in it): each argument lands
    in its field, the settings frozen, and the entry builds the diffusers class with those settings."""
    entry = schedulers._entry("ddim", "DDIMScheduler", "DDIM (Song et al. 2020)", clip_sample=False)
    assert (entry.id, entry.cls, dict(entry.settings), entry.source) == (
        "ddim", "DDIMScheduler", {"clip_sample": False}, "DDIM (Song et al. 2020)")
    with pytest.raises(TypeError):
        entry.settings["clip_sample"] = True
    made = entry.make()
    assert type(made).__name__ == "DDIMScheduler" and made.config.clip_sample is False

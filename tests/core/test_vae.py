"""The VAE: decode/encode (whole and tiled) against diffusers' AutoencoderKL, the resize back to the requested size,
the SD/SDXL family from names and configs, the single-file and folder layouts users have, and wrong pairings."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from pixart_core import t5_spec
from pixart_core import vae as cvae


def _diffusers_tiling_vae(vae, tile_latent: int):
    """The same weights in an AutoencoderKL whose own tile size is `tile_latent` latent pixels (diffusers derives it
    from sample_size: sample_size / 2**(blocks - 1)), tiling enabled: diffusers' tiled encode/decode geometry."""
    from diffusers import AutoencoderKL

    blocks = len(vae.config.block_out_channels)
    ref = AutoencoderKL.from_config({**vae.config, "sample_size": tile_latent * 2 ** (blocks - 1)}).eval()
    ref.load_state_dict(vae.state_dict())
    ref.enable_tiling()
    return ref


def test_tiled_and_whole_decode_are_diffusers_decodes():
    vae = tiny.make_vae()
    torch.manual_seed(2)
    z = torch.randn(2, 4, 24, 20)
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    ref = _diffusers_tiling_vae(vae, 8)
    with torch.no_grad():
        want_tiled = (ref.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        want_whole = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    done = []
    tiled = cvae.decode(vae, z, tiled=True, tile_latent=8, on_image=lambda i, n: done.append((i, n)))
    whole = cvae.decode(vae, z)
    assert tiled.dtype == whole.dtype == torch.float32 and tiled.shape == (2, 192, 160, 3)
    assert (tiled - want_tiled).abs().max() <= 1e-5
    assert (whole - want_whole).abs().max() <= 1e-5
    assert (tiled - whole).abs().max() > 1e-3  # the tiles really differ from one pass (blended seams)
    assert done == [(1, 2), (2, 2)]
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == before  # restored


def test_tiled_and_whole_encode_are_diffusers_posterior_means():
    vae = tiny.make_vae()
    torch.manual_seed(4)
    images = torch.rand(1, 192, 160, 3)
    ref = _diffusers_tiling_vae(vae, 8)
    x = images.movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        want_tiled = ref.encode(x).latent_dist.mode()
        want_whole = vae.encode(x).latent_dist.mode()
    tiled = cvae.encode(vae, images, tiled=True, tile_latent=8)
    whole = cvae.encode(vae, images)
    assert tiled.shape == whole.shape == (1, 4, 24, 20)
    assert (tiled - want_tiled).abs().max() <= 1e-5 and (whole - want_whole).abs().max() <= 1e-5
    assert (tiled - whole).abs().max() > 1e-4


def test_decode_resizes_back_as_diffusers_binning():
    from diffusers.image_processor import PixArtImageProcessor

    vae = tiny.make_vae()
    torch.manual_seed(5)
    z = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        image = vae.decode(z).sample
    want = (PixArtImageProcessor.resize_and_crop_tensor(image, 70, 50) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = cvae.decode(vae, z, target=(70, 50))
    assert got.shape == (1, 50, 70, 3) and (got - want).abs().max() <= 1e-5


VAE_NAMES = {"sdxl_vae.safetensors": "sdxl", "sd_xl_base_1.0_vae.safetensors": "sdxl", "SDXL-VAE-fp16-fix": "sdxl",
             "pixart_sigma_vae.safetensors": "sdxl", "vae-ft-mse-840000-ema-pruned.safetensors": "sd",
             "vae-ft-ema-560000-ema-pruned.safetensors": "sd", "sd15_vae.pt": "sd", "sd-vae-ft-ema": "sd",
             "PixArt-alpha-vae.safetensors": "sd", "my_vae.safetensors": None, "ae.safetensors": None}


@pytest.mark.parametrize("name", list(VAE_NAMES))
def test_vae_family_from_name(name):
    """File names of the SDXL VAE (PixArt-Σ) and the SD 1.x VAEs (PixArt-α) as they are published."""
    assert cvae.family_from_name(name) == VAE_NAMES[name]


def test_vae_family_from_config_scaling_factor():
    assert cvae.family_from_config({"scaling_factor": reference.VAE_SCALING["sdxl"]}) == "sdxl"
    assert cvae.family_from_config({"scaling_factor": reference.VAE_SCALING["sd"]}) == "sd"
    assert cvae.family_from_config({"scaling_factor": 0.3611}) is None  # e.g. a Flux VAE
    assert cvae.family_from_config({}) is None


@pytest.mark.parametrize("file_name,family", [("sdxl_vae.safetensors", "sdxl"), ("vae-ft-mse-840000.safetensors", "sd"),
                                               ("some_vae.safetensors", None)])
def test_single_file_vae_config_is_the_saved_models_config(tmp_path, file_name, family):
    """The config built from an LDM-layout file's shapes: the saved AutoencoderKL's, field by field (a VAE whose
    levels differ in width and have 2 resnets each, as the real ones)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    cfg = dict(tiny.vae_config(), block_out_channels=[32, 64, 64, 64], layers_per_block=2)
    torch.manual_seed(0)
    saved = AutoencoderKL(**cfg).eval()
    path = tmp_path / file_name
    save_file(tiny.vae_to_ldm(saved.state_dict()), str(path))
    vae, found = cvae.load_vae(path)
    assert found == family
    for field in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                  "layers_per_block", "act_fn", "latent_channels", "norm_num_groups"):
        assert vae.config[field] == saved.config[field], field
    assert vae.config.scaling_factor == reference.VAE_SCALING[family or "sdxl"]  # unknown: PixArt-Σ's
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, saved.decode(z).sample)


def test_vae_folder_with_bin_weights_and_private_config_keys(tmp_path):
    vae = tiny.make_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=False)
    assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.bin").is_file()
    loaded, family = cvae.load_vae(tmp_path / "pipe")
    assert family == "sdxl" and loaded.config.scaling_factor == reference.VAE_SCALING["sdxl"]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


def test_vae_folder_errors_name_the_folder(tmp_path):
    from pixart_core import files

    (tmp_path / "empty").mkdir()
    with pytest.raises(files.WeightFileError, match=r"empty: no config.json here or in vae/; not a diffusers VAE folder"):
        cvae.load_vae(tmp_path / "empty")
    tiny.make_vae().save_config(tmp_path / "noweights" / "vae")
    with pytest.raises(files.WeightFileError, match=r"vae: no diffusion_pytorch_model.safetensors in this folder"):
        cvae.load_vae(tmp_path / "noweights")
    (tmp_path / "t5").mkdir()
    with pytest.raises(files.WeightFileError, match=r"t5: no config.json here or in text_encoder/; not a transformers/diffusers T5 folder"):
        t5_spec.weights_folder(tmp_path / "t5")


def test_vae_single_files_in_every_layout_load_as_the_saved_vae(tmp_path):
    """LDM keys, LDM keys under a full checkpoint's prefix, diffusers keys: the same VAE; bf16 when asked; frozen."""
    from safetensors.torch import save_file

    from pixart_core import files

    vae = tiny.make_vae()
    ldm = tiny.vae_to_ldm(vae.state_dict())
    layouts = {"sdxl_vae.safetensors": ldm, "sdxl_vae_prefixed.safetensors": {f"first_stage_model.{k}": v
                                                                             for k, v in ldm.items()},
               "sdxl_vae_diffusers.safetensors": vae.state_dict(),
               "sdxl_vae_diffusers_prefixed.safetensors": {f"vae.{k}": v for k, v in vae.state_dict().items()}}
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
    for name, sd in layouts.items():
        save_file(sd, str(tmp_path / name))
        loaded, family = cvae.load_vae(tmp_path / name)
        assert family == "sdxl" and not any(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert (loaded.decode(z).sample - want).abs().max() <= 1e-6, name
    half, _ = cvae.load_vae(tmp_path / "sdxl_vae.safetensors", torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    save_file({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "stub.safetensors"))
    with pytest.raises(files.WeightFileError, match="stub.safetensors: this is not a VAE"):
        cvae.load_vae(tmp_path / "stub.safetensors")


def test_vae_folder_family_from_its_name_when_the_config_does_not_say(tmp_path):
    vae = tiny.make_vae()
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "my-sdxl-vae")
    assert cvae.load_vae(tmp_path / "my-sdxl-vae")[1] == "sdxl"
    vae.save_pretrained(tmp_path / "sd-vae")
    assert cvae.load_vae(tmp_path / "sd-vae")[1] == "sd"
    assert cvae.family_from_name("sd-vae.safetensors") == "sd"


def test_sdxl_encoded_latent_into_an_alpha_model_is_refused(tmp_path):
    from pixart_core import vae as cvae

    with pytest.raises(ValueError, match="SD latent space"):
        cvae.check_pairing("sd", "sdxl", "sdxl_vae.safetensors")
    cvae.check_pairing("sdxl", None, "my_vae.safetensors")  # unknown family: nothing to refuse


def test_decode_resize_back_matches_diffusers_binning(tiny_models):
    from diffusers.image_processor import PixArtImageProcessor

    from pixart_core import vae as cvae

    z = torch.randn(1, 4, 12, 8)
    got = cvae.decode(tiny_models["vae"], z, target=(70, 90))
    with torch.no_grad():
        full = tiny_models["vae"].decode(z).sample
    want = (PixArtImageProcessor.resize_and_crop_tensor(full, 70, 90) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert got.shape == (1, 90, 70, 3) and (got - want).abs().max() <= 1e-6


def test_tiled_decode_is_close_to_whole_decode(tiny_models):
    from pixart_core import vae as cvae

    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 24)
    whole = cvae.decode(tiny_models["vae"], z)
    one_tile = cvae.decode(tiny_models["vae"], z, tiled=True, tile_latent=32)
    assert torch.equal(one_tile, whole)  # a tile that covers everything is the whole decode
    tiled = cvae.decode(tiny_models["vae"], z, tiled=True, tile_latent=16)
    assert tiled.shape == whole.shape
    # blended tiles differ only near seams (a random VAE's global attention makes them differ more than a real one)
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.85


def test_tiled_encode_is_diffusers_tiled_encode():
    """The tiled encode is diffusers' own tiled encoder (AutoencoderKL.enable_tiling with the same tile
    size): a 128 px image in 64 px tiles, overlapping and blended."""
    from pixart_core import vae as cvae

    vae = tiny.make_vae()
    torch.manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16), size=(128, 128), mode="bilinear").movedim(1, -1)
    whole = cvae.encode(vae, img)
    tiled = cvae.encode(vae, img, tiled=True, tile_latent=8)
    reference = tiny.make_vae()
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = 64, 8
    with torch.no_grad():
        want = reference.encode(img.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert tiled.shape == whole.shape == (1, 4, 16, 16)
    assert not torch.equal(whole, tiled)  # really tiled
    torch.testing.assert_close(tiled, want, rtol=0, atol=1e-6)

"""Which PixArt variant a file is: from its name (release and community names, read by hand) and from its config (as
diffusers' PixArtTransformer2DModel reads the same config)."""
from __future__ import annotations

import pytest

from harness import models as tiny
from pixart_core.variants import variant_from_config, variant_from_name


# Release and community file names (hand-read: family and resolution as the name states them).
NAMES = {
    "PixArt-Sigma-XL-2-1024-MS.pth": "sigma-1024", "pixart_sigma_xl_2_512_ms.safetensors": "sigma-512",
    "PixArt-Sigma-XL-2-2K-MS.pth": "sigma-2k", "PixArt_Sigma_XL_2_2048.safetensors": "sigma-2k",
    "PixArt-Sigma-XL-2-256x256.pth": "sigma-256", "PixArt-XL-2-1024-MS.pth": "alpha-1024",
    "PixArt-XL-2-512x512.pth": "alpha-512", "pixart_xl_2_256x256.safetensors": "alpha-256",
    "PixArt-alpha-512.safetensors": "alpha-512", "PIXART-ALPHA-1024": "alpha-1024",
    "2k_pixart_sigma.safetensors": "sigma-2k", "PixArt-Sigma-900M-1024": "sigma-1024",
    "sigma_finetune_512": "sigma-512", "PixArt-Alpha-DMD-XL-2-512x512": "alpha-512",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_variant_from_release_names(name):
    assert variant_from_name(name).name == NAMES[name]


@pytest.mark.parametrize("name", ["my_finetune.safetensors", "PixArt-Sigma-XL-2.safetensors", "model_1024.pth",
                                  "pixart-sigma-10240", "pixart-sigma-5120", "alpha_sigma_768", "PixArt-XL-3-512"])
def test_names_that_say_too_little_give_none(name):
    assert variant_from_name(name) is None


def test_pixart_xl_2_names_without_alpha_are_alpha_but_sigma_wins():
    assert variant_from_name("pixart-xl-2-512").family == "alpha"
    assert variant_from_name("pixart-sigma-xl-2-512").family == "sigma"
    assert variant_from_name("alpha and sigma 512").family == "sigma"


@pytest.mark.parametrize("sample_size", [32, 64, 128, 256])
@pytest.mark.parametrize("micro", [None, False, True])
def test_variant_from_config_follows_diffusers_defaults(sample_size, micro):
    """Micro-conditioning as diffusers' PixArtTransformer2DModel decides it from the same config (None: its default)."""
    from diffusers import PixArtTransformer2DModel

    if micro and sample_size != 128:
        return  # only 1024-MS has the embedders; no release pairs them with another size
    cfg = tiny.dit_config(sample_size=sample_size)
    cfg["use_additional_conditions"] = micro
    model = PixArtTransformer2DModel(**cfg)
    v = variant_from_config({"sample_size": sample_size, "use_additional_conditions": micro}, "some-folder")
    assert v.micro_conditioning == model.use_additional_conditions
    assert v.sample_size == sample_size
    assert v.family == ("alpha" if model.use_additional_conditions else "sigma")
    if sample_size <= 128:  # the α release names a family; its sizes are 256/512/1024 px
        alpha = variant_from_config({"sample_size": sample_size, "use_additional_conditions": micro},
                                    "PixArt-XL-2-512x512")
        assert alpha.family == "alpha" and alpha.sample_size == sample_size


def test_variant_from_config_without_sample_size_is_diffusers_default():
    from diffusers import PixArtTransformer2DModel

    default = PixArtTransformer2DModel(**{k: v for k, v in tiny.dit_config().items() if k != "sample_size"})
    assert variant_from_config({}, "PixArt-Sigma-XL-2").sample_size == default.config.sample_size == 128
    with pytest.raises(ValueError, match=r"odd-folder: sample_size 48 matches no PixArt variant \(expected one of 32, 64, 128, 256\)"):
        variant_from_config({"sample_size": 48}, "odd-folder")
    with pytest.raises(ValueError, match=r"^config: sample_size 48"):
        variant_from_config({"sample_size": 48})

"""The ControlNet hint at sampling time (nodes/control_jobs.hint): the Apply's control image scaled to cover the
generation's size and centre-cropped (torch's antialiased bilinear resize, as torchvision's Resize does for tensors,
then its centre crop), mapped to [-1, 1], encoded by diffusers' AutoencoderKL (the posterior mean) and multiplied by
the DiT's latent scale; kept per latent size on the Apply (two sizes, the oldest dropped first), re-encoded for
none of them."""
from __future__ import annotations

import logging

import pytest
import torch

from harness import models as tiny
from harness.comfyui import pack

CPU = torch.device("cpu")
SCALE = 0.13025  # the SDXL VAE's latent scale, which PixArt-Σ uses ([Σ-repo] configs/PixArt_xl2_internal.py:58)


def _applied(image: torch.Tensor, vae):
    loading, types_ = pack("nodes.comfy.loading"), pack("nodes.types")
    handle = types_.VAEHandle(loading.wrap(vae, CPU, CPU), "tiny_sdxl_vae.safetensors", "sdxl")
    controlnet = types_.ControlNetHandle(None, "tiny-controlnet.safetensors", None, "")  # only its name is read here
    return types_.AppliedControl(controlnet, image, handle, 1.0, 0.0, 1.0)


def _reference(vae, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cover and centre-crop by hand with torch's resize, then diffusers' encode: the posterior mean times SCALE."""
    import torchvision.transforms.functional as tf

    x = image.movedim(-1, 1)
    h, w = x.shape[-2:]
    ratio = max(height / h, width / w)
    x = tf.resize(x, [max(height, round(h * ratio)), max(width, round(w * ratio))], antialias=True)
    x = tf.center_crop(x, [height, width])
    with torch.no_grad():
        return vae.encode(x * 2 - 1).latent_dist.mean * SCALE


def test_hint_is_the_cropped_image_encoded_once_per_size(comfy, caplog):
    jobs = pack("nodes.control_jobs")
    vae = tiny.make_vae()
    image = torch.rand(1, 40, 72, 3, generator=torch.Generator().manual_seed(3))  # wider than the generation
    applied = _applied(image, vae)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    caplog.set_level(logging.INFO)
    first = jobs.hint(applied, (6, 8), SCALE)  # latent (h, w): 6 x 8 latent pixels
    assert first.shape == (1, 4, 6, 8)
    torch.testing.assert_close(first, _reference(vae, image, 6 * factor, 8 * factor), atol=1e-5, rtol=1e-5)
    assert [r.getMessage() for r in caplog.records if "ControlNet" in r.getMessage()] == [
        f"PixArt ControlNet tiny-controlnet.safetensors: control image 72x40 scaled and centre-cropped to the "
        f"generation's {8 * factor}x{6 * factor}."]
    assert jobs.hint(applied, (6, 8), SCALE) is first  # kept: not encoded again
    second = jobs.hint(applied, (8, 6), SCALE)
    assert second.shape == (1, 4, 8, 6)
    jobs.hint(applied, (4, 4), SCALE)  # a third size: the oldest (6 x 8) goes
    assert list(applied.hints) == [(8, 6), (4, 4)]
    assert jobs.hint(applied, (6, 8), SCALE) is not first


def test_an_image_of_the_generations_size_is_encoded_as_it_is(comfy, caplog):
    jobs = pack("nodes.control_jobs")
    vae = tiny.make_vae()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image = torch.rand(2, 6 * factor, 8 * factor, 3, generator=torch.Generator().manual_seed(4))
    caplog.set_level(logging.INFO)
    got = jobs.hint(_applied(image, vae), (6, 8), SCALE)
    with torch.no_grad():
        want = vae.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mean * SCALE
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not [r for r in caplog.records if "ControlNet" in r.getMessage()]  # nothing scaled, nothing said


def test_a_batch_of_control_images_that_does_not_divide_the_generations_is_refused(comfy):
    """Two control images for a batch of three: neither one for all nor one each (ControlNet Apply's rule)."""
    import dataclasses

    from harness.graphs import DIT_FILE

    jobs = pack("nodes.control_jobs")
    dit = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaDiTLoader"].execute(dit_name=DIT_FILE, variant="auto",
                                                                     dtype="fp32").result[0]
    applied = _applied(torch.rand(2, 48, 64, 3), tiny.make_vae())
    controlled = dataclasses.replace(dit, controls=(applied,))
    with pytest.raises(ValueError) as e:
        jobs.load(controlled, (6, 8), 3, (3, 6, 8), 0)
    assert str(e.value) == ("PixArt ControlNet tiny-controlnet.safetensors: 2 control images for a batch of 3: give "
                            "one control image for the whole batch, or one per image.")

"""Inpainting in the sampling loop: outside the mask the image (re-noised to each step as diffusers' add_noise does on
the published scheduler, a closed form checked by hand), an all-ones mask as plain img2img, a mask without an image
refused."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from cases import SIZE
from cases import box_mask as _box_mask
from cases import noise as _noise
from pixart_core import sampling


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_inpainting_keeps_the_image_outside_the_mask(dit_and_conds, name):
    """Outside the mask: the image, re-noised to the timestep a stage stops at (diffusers' add_noise on the
    published scheduler: a hand-checkable closed form), and the image itself at the end of the schedule."""
    dit, pos, neg = dit_and_conds
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    mask = _box_mask()
    noise, gen = _noise()
    stage, _ = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen,
                               init_latents=init, mask=mask, end_step=3, leftover_noise=True, return_state=True)
    ref = reference.scheduler(name)
    ref.set_timesteps(6)
    # where the latents are after 3 steps: the next timestep; diffusers' DDIM steps to t - 1000 // steps instead
    t3 = ref.timesteps[2] - 1000 // 6 if name == "ddim" else ref.timesteps[3]
    a = ref.alphas_cumprod[int(t3)]
    renoised = ref.add_noise(init, noise, t3.reshape(1))  # sqrt(a) x0 + sqrt(1 - a) noise
    assert (renoised - (a.sqrt() * init + (1 - a).sqrt() * noise)).abs().max() < 1e-5
    outside = mask == 0
    # the LATENT holds ComfyUI's form x0 + sigma * noise (= the VP latent / sqrt(a))
    assert (stage - renoised / a.sqrt())[outside.expand_as(stage)].abs().max() < 1e-4
    noise, gen = _noise()
    full = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen,
                           init_latents=init, mask=mask)
    assert torch.equal(full[outside.expand_as(full)], init[outside.expand_as(init)])
    assert (full - init)[~outside.expand_as(full)].abs().min() > 0  # the masked part was repainted


def test_all_ones_mask_is_plain_img2img(dit_and_conds):
    dit, pos, neg = dit_and_conds
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    for denoise in (1.0, 0.5):
        noise, gen = _noise()
        plain = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, init_latents=init, denoise=denoise, generator=gen)
        noise, gen = _noise()
        ones = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, init_latents=init, denoise=denoise,
                               generator=gen, mask=torch.ones(1, 1, SIZE, SIZE))
        assert torch.equal(plain, ones)


def test_mask_without_latent_is_refused(dit_and_conds):
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    with pytest.raises(ValueError, match="inpainting mask needs the image's latent"):
        sampling.sample(dit, pos, neg, noise, steps=2, cfg=4.5, mask=_box_mask())

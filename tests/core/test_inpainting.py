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


def _soft_box(batch: int = 2) -> torch.Tensor:
    """The 4x4 box of cases.box_mask with soft edges (0.25, 0.5, 0.75 around it), as a feathered mask resizes."""
    m = torch.zeros(batch, 1, SIZE // 8, SIZE // 8)
    m[:, :, 1:7, 0:6] = 0.25
    m[:, :, 2:6, 1:5] = 0.75
    m[:, :, 3:5, 2:4] = 1.0
    m[:, :, 2, 1] = 0.5
    return m


def _comfyui_inpainting_loop(dit, pos, neg, noise, init, mask, steps, cfg, name):
    """ComfyUI's inpainting (comfy/samplers.py KSamplerX0Inpaint) written out on diffusers' published scheduler: the
    model's input is the solver's latents with the image noised to the step outside the mask, x·m + noised·(1 − m);
    its clean estimate is blended with the image, denoised·m + image·(1 − m); the solver steps its own (unblended)
    latents on the epsilon of that blended estimate. Clean estimate and epsilon, by hand: Euler's latents are
    x0 + sigma·eps, the variance-preserving ones sqrt(a)·x0 + sqrt(1 − a)·eps."""
    sch = reference.scheduler(name)
    sch.set_timesteps(steps)
    lat = sch.add_noise(init, noise, sch.timesteps[:1].repeat(noise.shape[0]))
    emb = torch.cat([neg.embeds.repeat(2, 1, 1), pos.embeds.repeat(2, 1, 1)])
    msk = torch.cat([neg.mask.repeat(2, 1), pos.mask.repeat(2, 1)])
    with torch.no_grad():
        for t in sch.timesteps:
            model_lat = lat * mask + sch.add_noise(init, noise, t.reshape(1).repeat(2)) * (1 - mask)
            x = sch.scale_model_input(model_lat, t)
            out = dit(torch.cat([x] * 2), encoder_hidden_states=emb, encoder_attention_mask=msk,
                      timestep=t[None].expand(4), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      return_dict=False)[0]
            u, c = out.chunk(2)
            eps = (u + cfg * (c - u))[:, :4]
            if name == "euler":
                sigma = sch.sigmas[sch.step_index]
                denoised = (model_lat - sigma * eps) * mask + init * (1 - mask)
                eps = (lat - denoised) / sigma
            else:
                a = sch.alphas_cumprod[int(t)]
                denoised = (x - (1 - a).sqrt() * eps) / a.sqrt() * mask + init * (1 - mask)
                eps = (lat - a.sqrt() * denoised) / (1 - a).sqrt()
            lat = sch.step(eps, t, lat).prev_sample
    return lat


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
@pytest.mark.parametrize("mask", [_box_mask(), _soft_box()], ids=["hard", "soft"])
def test_inpainting_blends_clean_estimates_as_comfyui(dit_and_conds, name, mask):
    """The whole latent, inside and outside the mask, equals ComfyUI's inpainting rule on diffusers' scheduler (both
    schedules end at sigma 0, where the result is the last blended clean estimate). With a soft mask (the edges of a
    feathered or resized mask) blending the clean estimates differs from blending the noise predictions."""
    dit, pos, neg = dit_and_conds
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    noise, gen = _noise()
    want = _comfyui_inpainting_loop(dit, pos, neg, noise, init, mask, 6, 4.5, name)
    got = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen, init_latents=init,
                          mask=mask)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_latent_size_masks_per_image_as_separate_runs(dit_and_conds):
    """A mask already at latent size ([B, 4, h, w], here bool, as a comparison gives it) belongs to its own image: a
    batch of two images with different masks samples as each image alone with its own mask (a deterministic solver;
    the DiT treats the images of a batch independently)."""
    dit, pos, neg = dit_and_conds
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 4, SIZE // 8, SIZE // 8, dtype=torch.bool)
    mask[0, :, 2:6, 1:5] = True
    mask[1, :, 0:3, 4:8] = True
    kw = dict(steps=4, cfg=4.5, scheduler="dpmpp_2m")
    noise, _ = _noise()
    both = sampling.sample(dit, pos, neg, noise, init_latents=init, mask=mask, **kw)
    for i in range(2):
        alone = sampling.sample(dit, pos, neg, noise[i:i + 1], init_latents=init[i:i + 1], mask=mask[i:i + 1].float(),
                                **kw)
        assert (both[i:i + 1] - alone).abs().max() <= 1e-5 * alone.abs().max(), i

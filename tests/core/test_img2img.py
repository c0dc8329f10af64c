"""img2img: the input latent noised as diffusers' img2img strength does for every scheduler, the denoise rules (by
hand), and the one-step DMD model refusing img2img."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import reference_settings as reference
from cases import SIZE
from cases import record_calls as _record_calls
from harness import models as tiny
from pixart_core import sampling, schedulers


def test_check_denoise_refuses_exactly_what_runs_nothing():
    """The denoise rules by hand: text-to-image needs denoise 1; img2img runs int(steps * denoise) steps, so
    0.04 of 20 steps runs none (the smallest that runs one is 1/20 = 0.05)."""
    from pixart_core.request import check_denoise

    check_denoise(1.0, 20, img2img=False)
    check_denoise(0.05, 20, img2img=True)
    check_denoise(1.0, 1, img2img=True)
    cases = [
        ((0.99, 20, False), "PixArt sampler: denoise below 1.0 needs an input latent (connect 'latent' for img2img)."),
        ((0.0, 20, True), "PixArt sampler: denoise 0 runs no step; use a value in (0, 1]."),
        ((0.04, 20, True), "denoise 0.04 of 20 steps runs no step; use denoise >= 0.05 or more steps."),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            check_denoise(*args[:2], img2img=args[2])
        assert str(e.value) == message


@pytest.mark.parametrize("name", [s for s in reference.SCHEDULERS if s != schedulers.DMD])
@pytest.mark.parametrize("steps,denoise", [(10, 0.6), (7, 0.3)])
def test_img2img_noises_the_input_as_diffusers_strength_does(conds, name, steps, denoise):
    """The first DiT input is the input latent noised at diffusers' img2img start timestep (StableDiffusionImg2Img
    get_timesteps + scheduler.add_noise, with the release's scheduler), and every later timestep follows."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pos, neg = conds
    dit = tiny.make_dit()
    torch.manual_seed(1)
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    noise, gen = sampling.initial_noise(3, 2, 4, SIZE, SIZE)
    calls, handle = _record_calls(dit)
    try:
        sampling.sample(dit, pos, neg, noise, steps=steps, cfg=4.5, scheduler=name, generator=gen,
                        init_latents=init, denoise=denoise)
    finally:
        handle.remove()
    ref = reference.scheduler(name)
    ref.set_timesteps(steps)
    timesteps, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, denoise, "cpu")
    want_first = ref.scale_model_input(ref.add_noise(init, noise, timesteps[:1].repeat(2)), timesteps[0])
    assert len(calls) == len(timesteps) == n
    assert torch.allclose(torch.stack([t[0].float() for _, t in calls]), timesteps.float())
    first = calls[0][0]
    assert torch.allclose(first[:2], first[2:])  # [negative, positive] halves see the same latents
    assert (first[2:] - want_first).abs().max() <= 1e-5


def test_dmd_refuses_img2img(conds):
    pos, neg = conds
    noise, _ = sampling.initial_noise(0, 1, 4, SIZE, SIZE)
    with pytest.raises(ValueError, match="does not do img2img"):
        sampling.sample(tiny.make_dit(), pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD,
                        init_latents=torch.zeros(1, 4, 8, 8), denoise=0.5)


def test_input_latents_follow_the_noise_batch(conds):
    """The input latents are repeated or cut to the noise's batch image by image in turn, as ComfyUI's
    comfy.utils.repeat_to_batch_size does (tensor.repeat(ceil(batch / n), 1, 1, 1)[:batch]): two inputs with three
    noises run as [i0, i1, i0], three with two as [i0, i1], two with four as [i0, i1, i0, i1], six (more than the
    latent's 4 channels) with seven as [i0 .. i5, i0]."""
    pos, neg = conds
    dit = tiny.make_dit()
    init = torch.randn(6, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    kw = dict(steps=4, cfg=4.5, scheduler="ddim", denoise=0.5)
    cases = ((init[:2], 3, init[[0, 1, 0]]), (init[:3], 2, init[:2]), (init[:2], 4, init[[0, 1, 0, 1]]),
             (init, 7, init[[0, 1, 2, 3, 4, 5, 0]]))
    for given, batch, want in cases:
        noise, _ = sampling.initial_noise(6, batch, 4, SIZE, SIZE)
        got = sampling.sample(dit, pos, neg, noise, init_latents=given, **kw)
        assert torch.equal(got, sampling.sample(dit, pos, neg, noise, init_latents=want, **kw)), (len(given), batch)


def test_half_precision_latents_sample_as_their_float32_values(conds):
    """Noise and input latents handed over in float16 (a node may keep a LATENT in half precision) sample exactly as
    the same values in float32: the solver runs in float32, as diffusers' pipeline does with float32 latents."""
    pos, neg = conds
    dit = tiny.make_dit()
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4)).half()
    noise, _ = sampling.initial_noise(6, 2, 4, SIZE, SIZE)
    noise = noise.half()
    kw = dict(steps=4, cfg=4.5, scheduler="ddim")
    got = sampling.sample(dit, pos, neg, noise, init_latents=init, denoise=0.5, **kw)
    assert torch.equal(got, sampling.sample(dit, pos, neg, noise.float(), init_latents=init.float(), denoise=0.5, **kw))
    assert torch.equal(sampling.sample(dit, pos, neg, noise, **kw), sampling.sample(dit, pos, neg, noise.float(), **kw))

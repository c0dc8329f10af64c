"""Our sampling loop against diffusers' PixArtSigmaPipeline: same weights, embeddings and noise; the pipeline's
scheduler is built from the release's published settings (tests/reference_settings.py), never by the pack."""
from __future__ import annotations

import copy

import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from pixart_core import sampling, schedulers

STEPS, CFG, SIZE = 4, 4.5, 64


@pytest.fixture(scope="module")
def setup(dit_and_conds):
    dit, pos, neg = dit_and_conds
    return dit, tiny.make_vae(), pos, neg


def _pipeline(dit, vae, scheduler_name):
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit,
                               scheduler=reference.scheduler(scheduler_name))


@pytest.mark.parametrize("scheduler", [s for s in schedulers.SCHEDULERS if s != schedulers.DMD])
def test_latents_match_pixart_sigma_pipeline(setup, scheduler):
    dit, vae, pos, neg = setup
    seed, batch = 1234, 2
    noise, gen = sampling.initial_noise(seed, batch, 4, SIZE, SIZE)
    ours = sampling.sample(dit, pos, neg, noise, steps=STEPS, cfg=CFG, scheduler=scheduler, generator=gen)

    _, ref_gen = sampling.initial_noise(seed, batch, 4, SIZE, SIZE)  # same generator state after the noise
    pipe = _pipeline(dit, vae, scheduler)
    ref = pipe(prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask,
               negative_prompt_embeds=neg.embeds, negative_prompt_attention_mask=neg.mask, num_images_per_prompt=batch,
               latents=noise.clone(), generator=ref_gen, num_inference_steps=STEPS, guidance_scale=CFG,
               height=SIZE, width=SIZE, output_type="latent", use_resolution_binning=False).images
    assert ours.shape == ref.shape == (batch, 4, SIZE // 8, SIZE // 8)
    assert (ours - ref).abs().max() <= 1e-4


def test_cfg_one_runs_no_negative_pass_like_diffusers(setup):
    dit, vae, pos, neg = setup
    noise, gen = sampling.initial_noise(5, 1, 4, SIZE, SIZE)
    ours = sampling.sample(dit, pos, neg, noise, steps=STEPS, cfg=1.0, generator=gen)
    ref = _pipeline(dit, vae, schedulers.DEFAULT)(
        prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, latents=noise.clone(),
        num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="latent",
        use_resolution_binning=False).images
    assert (ours - ref).abs().max() <= 1e-4


def test_default_scheduler_is_the_official_config():
    s = schedulers.make(schedulers.DEFAULT)
    cfg = s.config
    assert type(s).__name__ == "DPMSolverMultistepScheduler"
    assert (cfg.algorithm_type, cfg.solver_order, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
            cfg.num_train_timesteps, cfg.prediction_type, cfg.timestep_spacing) == (
        "dpmsolver++", 2, "linear", 0.0001, 0.02, 1000, "epsilon", "linspace")


def _alpha_pipeline(dit, vae, scheduler):
    from diffusers import PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit, scheduler=scheduler)


def test_alpha_1024_micro_conditioning_matches_pixart_alpha_pipeline(setup):
    _, vae, pos, neg = setup
    dit = tiny.make_dit(micro=True)  # alpha-1024-MS: resolution + aspect-ratio embedders
    noise, gen = sampling.initial_noise(9, 2, 4, 96, 64)  # non-square: height 96, width 64
    ours = sampling.sample(dit, pos, neg, noise, steps=STEPS, cfg=CFG, generator=gen)
    ref = _alpha_pipeline(dit, vae, reference.scheduler(schedulers.DEFAULT))(
        prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask,
        negative_prompt_embeds=neg.embeds, negative_prompt_attention_mask=neg.mask, num_images_per_prompt=2,
        latents=noise.clone(), num_inference_steps=STEPS, guidance_scale=CFG, height=96, width=64,
        output_type="latent", use_resolution_binning=False).images
    assert (ours - ref).abs().max() <= 1e-4
    # The size really reaches the model: without the resolution/aspect-ratio embeddings the result changes.
    blind = copy.deepcopy(dit)
    with torch.no_grad():
        for emb in (blind.adaln_single.emb.resolution_embedder, blind.adaln_single.emb.aspect_ratio_embedder):
            emb.linear_2.weight.zero_()
            emb.linear_2.bias.zero_()
    _, gen = sampling.initial_noise(9, 2, 4, 96, 64)
    without = sampling.sample(blind, pos, neg, noise, steps=STEPS, cfg=CFG, generator=gen)
    assert not torch.allclose(without, ours, atol=1e-3)


def test_dmd_one_step_matches_the_dmd_release_sampling(setup):
    _, vae, pos, neg = setup
    dit = tiny.make_dit(sample_size=64, interpolation_scale=1.0)
    noise, gen = sampling.initial_noise(21, 1, 4, SIZE, SIZE)
    calls = []
    ours = sampling.sample(dit, pos, neg, noise, steps=25, cfg=1.0, scheduler=schedulers.DMD, generator=gen,
                           on_step=lambda i, n, x0: calls.append((i, n)))
    _, ref_gen = sampling.initial_noise(21, 1, 4, SIZE, SIZE)
    ref = _alpha_pipeline(dit, vae, reference.scheduler(schedulers.DMD))(
        prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, latents=noise.clone(),
        generator=ref_gen, timesteps=reference.DMD_TIMESTEPS, num_inference_steps=1,
        guidance_scale=reference.DMD_GUIDANCE, height=SIZE, width=SIZE,
        output_type="latent", use_resolution_binning=False).images
    assert calls == [(1, 1)]
    assert (ours - ref).abs().max() <= 1e-4


def test_img2img_schedule_follows_diffusers_strength(setup):
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    for steps, denoise in [(20, 0.5), (20, 0.3), (7, 0.75), (4, 1.0)]:
        ours = schedulers.make(schedulers.DEFAULT)
        ours.set_timesteps(steps)
        ts, n = sampling.img2img_timesteps(ours, steps, denoise)
        ref = reference.scheduler(schedulers.DEFAULT)
        ref.set_timesteps(steps)
        want, want_n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, denoise, "cpu")
        assert torch.equal(ts, want) and n == want_n, (steps, denoise)


def test_img2img_stays_closer_to_the_input_than_text_to_image(setup):
    dit, vae, pos, neg = setup
    torch.manual_seed(0)
    image_latents = torch.randn(1, 4, 8, 8) * 0.8
    noise, gen = sampling.initial_noise(3, 1, 4, SIZE, SIZE)
    i2i = sampling.sample(dit, pos, neg, noise, steps=10, cfg=CFG, init_latents=image_latents, denoise=0.5, generator=gen)
    noise, gen = sampling.initial_noise(3, 1, 4, SIZE, SIZE)
    t2i = sampling.sample(dit, pos, neg, noise, steps=10, cfg=CFG, generator=gen)
    assert (i2i - image_latents).norm() < 0.5 * (t2i - image_latents).norm()

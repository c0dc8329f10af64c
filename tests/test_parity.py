"""Our sampling loop against diffusers' PixArtSigmaPipeline: same weights, embeddings, noise and scheduler."""
from __future__ import annotations

import pytest
import torch

import tiny
from pixart_core import sampling

STEPS, CFG, SIZE = 4, 4.5, 64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(3)
    pos = sampling.Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] * 9 + [0] * 3]))
    neg = sampling.Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] + [0] * 11]))
    return tiny.make_dit(), tiny.make_vae(), pos, neg


def _pipeline(dit, vae, scheduler_name):
    from diffusers import PixArtSigmaPipeline

    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit,
                               scheduler=sampling.make_scheduler(scheduler_name))


@pytest.mark.parametrize("scheduler", list(sampling.SCHEDULERS))
def test_latents_match_pixart_sigma_pipeline(setup, scheduler):
    dit, vae, pos, neg = setup
    seed, batch = 1234, 2
    noise, gen = sampling.initial_noise(seed, batch, 4, SIZE, SIZE)
    ours = sampling.sample(dit, pos, neg, noise, steps=STEPS, cfg=CFG, scheduler_name=scheduler, generator=gen)

    _, ref_gen = sampling.initial_noise(seed, batch, 4, SIZE, SIZE)  # same generator state after the noise
    pipe = _pipeline(dit, vae, scheduler)
    ref = pipe(prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask,
               negative_prompt_embeds=neg.embeds, negative_prompt_attention_mask=neg.mask, num_images_per_prompt=batch,
               latents=noise.clone(), generator=ref_gen, num_inference_steps=STEPS, guidance_scale=CFG,
               height=SIZE, width=SIZE, output_type="latent", use_resolution_binning=False).images
    assert ours.shape == ref.shape == (batch, 4, SIZE // 8, SIZE // 8)
    assert (ours - ref).abs().max() <= 1e-4
    assert ours.abs().mean() > 0.05  # a real trajectory, not zeros


def test_cfg_one_runs_no_negative_pass_like_diffusers(setup):
    dit, vae, pos, neg = setup
    noise, gen = sampling.initial_noise(5, 1, 4, SIZE, SIZE)
    ours = sampling.sample(dit, pos, neg, noise, steps=STEPS, cfg=1.0, generator=gen)
    ref = _pipeline(dit, vae, sampling.DEFAULT_SCHEDULER)(
        prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, latents=noise.clone(),
        num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="latent",
        use_resolution_binning=False).images
    assert (ours - ref).abs().max() <= 1e-4


def test_default_scheduler_is_the_official_config():
    s = sampling.make_scheduler(sampling.DEFAULT_SCHEDULER)
    cfg = s.config
    assert type(s).__name__ == "DPMSolverMultistepScheduler"
    assert (cfg.algorithm_type, cfg.solver_order, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
            cfg.num_train_timesteps, cfg.prediction_type, cfg.timestep_spacing) == (
        "dpmsolver++", 2, "linear", 0.0001, 0.02, 1000, "epsilon", "linspace")

"""Staged sampling: two stages (the first stopping with leftover noise and handing on its solver state) give one
run's latents bit for bit, inpainting included; without the state the second stage restarts the solver as
KSamplerAdvanced does; an early stop returns the clean estimate or ComfyUI's leftover form. References: diffusers
schedulers built from the releases' published settings (tests/reference_settings.py) and diffusers' pipeline loop
written out (tests/cases.py)."""
from __future__ import annotations

import pytest
import torch

from cases import SIZE
from cases import box_mask as _box_mask
from cases import noise as _noise
from cases import pipeline_loop as _reference_loop
from pixart_core import sampling


@pytest.mark.parametrize("name", ["dpmpp_2m", "sa_solver", "unipc", "euler_ancestral", "ddpm", "ddim"])
def test_two_stages_equal_one_run(dit_and_conds, name):
    """Stage 1 stops with leftover noise and hands its solver state on in the LATENT; stage 2 continues: the same
    latents as one run, bit for bit, for multistep (history) and stochastic (generator) schedulers alike."""
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    whole = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen)
    noise, gen = _noise()
    first, state = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen,
                                   end_step=4, leftover_noise=True, return_state=True)
    noise, gen = _noise(seed=99)  # stage 2's own seed: its noise is not added (add_noise off)
    second = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen,
                             init_latents=first, start_step=4, add_noise=False, resume=state)
    assert torch.equal(second, whole)


def test_two_inpainting_stages_equal_one_inpainting_run(dit_and_conds):
    """The state also carries the image and noise that stage 2 keeps re-noising outside the mask."""
    dit, pos, neg = dit_and_conds
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    kw = dict(steps=6, cfg=4.5, scheduler="dpmpp_2m", mask=_box_mask())
    noise, gen = _noise()
    whole = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=init, **kw)
    noise, gen = _noise()
    first, state = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=init, end_step=2,
                                   leftover_noise=True, return_state=True, **kw)
    noise, gen = _noise(seed=99)
    second = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=first, start_step=2, add_noise=False,
                             resume=state, **kw)
    assert torch.equal(second, whole)


def test_stage_two_without_the_state_restarts_the_solver(dit_and_conds):
    """Without the state (e.g. the LATENT went through a file), stage 2 restarts as KSamplerAdvanced does: the
    first-order deterministic DDIM still gives one run's result; DPM-Solver++ 2M's first step is then first order."""
    dit, pos, neg = dit_and_conds
    results = {}
    for name in ("ddim", "dpmpp_2m"):
        noise, gen = _noise()
        whole = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen)
        noise, gen = _noise()
        first = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen,
                                end_step=3, leftover_noise=True)
        second = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler=name, generator=gen,
                                 init_latents=first, start_step=3, add_noise=False)
        results[name] = ((second - whole).abs().max() / whole.abs().max()).item()
    assert results["ddim"] <= 1e-6 and results["dpmpp_2m"] > 1e-3  # relative (random tiny weights: large latents)


def test_early_stop_returns_the_clean_estimate_or_comfyui_leftover(dit_and_conds):
    """end_step < steps: without leftover noise the stage jumps to the step's clean estimate (KSamplerAdvanced sets
    the last sigma to 0: DDIM's pred_original_sample); with it, ComfyUI's form x0 + sigma * noise = x_t / sqrt(a_t)."""
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    ref_x, res, sch = _reference_loop(dit, pos, neg, noise, 6, 4.5, "ddim", stop=4)
    clean = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler="ddim", generator=gen, end_step=4)
    assert (clean - res.pred_original_sample).abs().max() <= 1e-4
    leftover = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler="ddim", generator=gen,
                               end_step=4, leftover_noise=True)
    a = sch.alphas_cumprod[int(sch.timesteps[3]) - 1000 // 6]  # diffusers' DDIM steps to t - 1000 // steps
    assert (leftover - ref_x / a.sqrt()).abs().max() <= 1e-4


def test_stage_arguments_are_checked(dit_and_conds):
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    with pytest.raises(ValueError, match="runs no step"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, end_step=3, start_step=3, init_latents=noise)
    with pytest.raises(ValueError, match="continues an input latent"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, start_step=2)
    with pytest.raises(ValueError, match="use one of them"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, end_step=3, init_latents=noise, denoise=0.5)

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
from harness import models as tiny
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


# Every scheduler that stages (DMD runs one step from noise: no stages).
STAGING = ["dpmpp_2m", "sa_solver", "ddim", "euler", "euler_ancestral", "unipc", "ddpm", "lcm"]


@pytest.mark.parametrize("name", STAGING)
def test_leftover_latent_is_comfyui_form_at_the_stage_end(dit_and_conds, name):
    """A stage stopping at step 4 of 7 with leftover noise hands on x0 + sigma * noise, ComfyUI's (k-diffusion's)
    form, at the noise level the solver reached: diffusers' own loop (tests/cases.py, the published scheduler, the
    same generator for the stochastic ones) stopped after 4 steps holds the variance-preserving sqrt(a) x0 +
    sqrt(1 - a) noise, divided here by sqrt(a) of that level (diffusers' alphas_cumprod): the next timestep of its
    schedule; DDIM's step lands on t - 1000 // steps instead (its prev_timestep). Euler's schedulers already keep
    x0 + sigma * noise (their sigmas): their latents as they are."""
    dit, pos, neg = dit_and_conds
    steps, end = 7, 4
    noise, gen = _noise()
    ref, _, sch = _reference_loop(dit, pos, neg, noise, steps, 4.5, name, stop=end, generator=gen)
    if name in ("euler", "euler_ancestral"):
        want = ref
    else:
        level = int(sch.timesteps[end - 1]) - 1000 // steps if name == "ddim" else int(sch.timesteps[end])
        want = ref / sch.alphas_cumprod[level].sqrt()
    noise, gen = _noise()
    leftover = sampling.sample(dit, pos, neg, noise, steps=steps, cfg=4.5, scheduler=name, generator=gen,
                               end_step=end, leftover_noise=True)
    assert ((leftover - want).abs().max() / want.abs().max()).item() <= 1e-5


def _clean_estimate(result):
    """The clean latent a diffusers scheduler's step estimated: its output's pred_original_sample (DDIM, DDPM, the
    Euler schedulers) or denoised (LCM); the multistep solvers keep it as their newest model output (DPM-Solver++,
    UniPC and SA-Solver in data prediction)."""
    output, scheduler = result
    for field in ("pred_original_sample", "denoised"):
        if getattr(output, field, None) is not None:
            return getattr(output, field)
    return scheduler.model_outputs[-1]


@pytest.mark.parametrize("name", STAGING)
@pytest.mark.parametrize("steps,end", [(7, 4), (20, 5)])
def test_early_stop_is_the_solvers_clean_estimate(dit_and_conds, name, steps, end):
    """end_step < steps without leftover noise: KSamplerAdvanced sets the stage's last sigma to 0, so its last step
    lands on that step's clean estimate: the one diffusers' scheduler computes at that step (the Euler schedulers'
    timesteps fall between trained ones here, 7 steps: 499.5; 20 steps: 788.68)."""
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    _, res, sch = _reference_loop(dit, pos, neg, noise, steps, 4.5, name, stop=end, generator=gen)
    want = _clean_estimate((res, sch))
    noise, gen = _noise()
    clean = sampling.sample(dit, pos, neg, noise, steps=steps, cfg=4.5, scheduler=name, generator=gen, end_step=end)
    assert ((clean - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("edit", [lambda x: x * 1.0001, lambda x: x + 1e-3], ids=["multiply", "add"])
def test_a_latent_edited_between_stages_restarts_the_solver(dit_and_conds, caplog, edit):
    """Stage 2 gets stage 1's state with a latent changed on the way (as ComfyUI's LatentMultiply / LatentAdd keep
    the LATENT's other keys): the solver restarts from the edited latent, exactly as a stage 2 given no state, and
    says so; the unedited latent continues."""
    import logging

    dit, pos, neg = dit_and_conds
    kw = dict(steps=6, cfg=4.5, scheduler="dpmpp_2m")
    noise, gen = _noise()
    first, state = sampling.sample(dit, pos, neg, noise, generator=gen, end_step=3, leftover_noise=True,
                                   return_state=True, **kw)
    edited = edit(first)
    noise, gen = _noise(seed=99)
    with caplog.at_level(logging.INFO, logger="pixart_sigma.sampling"):
        with_state = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=edited, start_step=3,
                                     add_noise=False, resume=state, **kw)
    assert [r.getMessage() for r in caplog.records if r.name == "pixart_sigma.sampling"] == [
        "PixArt sampler: the input latent is not the previous stage's own output (or the stages' scheduler/steps "
        "differ); the solver restarts at step 3."]
    restart = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=edited, start_step=3, add_noise=False,
                              **kw)
    assert torch.equal(with_state, restart)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixart_sigma.sampling"):
        continued = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=first, start_step=3,
                                    add_noise=False, resume=state, **kw)
    assert "restarts" not in caplog.text
    noise, gen = _noise()
    whole = sampling.sample(dit, pos, neg, noise, generator=gen, **kw)
    assert torch.equal(continued, whole)
    unedited_restart = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=first, start_step=3,
                                       add_noise=False, **kw)
    assert ((unedited_restart - whole).abs().max() / whole.abs().max()).item() > 1e-3  # a restart is visible


@pytest.mark.parametrize("name", ["dpmpp_2m", "sa_solver", "euler_ancestral", "unipc"])
def test_stage_two_with_another_dit_continues_the_solver_with_it(conds, name):
    """Two different DiTs (the two-stage experts): stage 1 with DiT A hands its state on, stage 2 runs DiT B. The
    reference is diffusers' loop on one scheduler that uses A's predictions for steps 0-2 and B's from step 3 on
    (the solver's history and generator running through), composed in the test."""
    pos, neg = conds
    dit_a, dit_b = tiny.make_dit(seed=0), tiny.make_dit(seed=1)
    kw = dict(steps=6, cfg=4.5, scheduler=name)
    noise, gen = _noise()
    want, _, _ = _reference_loop(dit_a, pos, neg, noise, 6, 4.5, name, generator=gen, switch=(3, dit_b))
    noise, gen = _noise()
    first, state = sampling.sample(dit_a, pos, neg, noise, generator=gen, end_step=3, leftover_noise=True,
                                   return_state=True, **kw)
    noise, gen = _noise(seed=99)
    second = sampling.sample(dit_b, pos, neg, noise, generator=gen, init_latents=first, start_step=3, add_noise=False,
                             resume=state, **kw)
    assert ((second - want).abs().max() / want.abs().max()).item() <= 1e-5
    noise, gen = _noise()
    only_a = sampling.sample(dit_a, pos, neg, noise, generator=gen, **kw)
    assert ((second - only_a).abs().max() / only_a.abs().max()).item() > 1e-3  # stage 2 did use DiT B


def _stepped_unipc(steps: int = 6, taken: int = 2):
    """diffusers' UniPC (the release's training schedule, tests/reference_settings.py) after `taken` steps: its
    history holds latent-sized tensors in a list (model_outputs) and alone (last_sample), its schedule 1-D ones."""
    import reference_settings as ref

    s = ref.scheduler("unipc")
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in s.timesteps[:taken]:
        x = s.step(torch.randn(1, 4, 8, 8, generator=g), t, x).prev_sample
    return s, x, g


def test_moved_history_moves_the_latent_sized_tensors_only():
    """Moving a solver's history to another device (meta: nothing is copied): the latent-sized tensors (4-D, alone
    or in a list) go, the schedule's 1-D tensors and the list's other entries stay, the original is not touched."""
    from pixart_core import stages

    s, _, _ = _stepped_unipc()
    moved = stages.moved_history(s, torch.device("meta"))
    assert moved.last_sample.device.type == "meta" and s.last_sample.device.type == "cpu"
    assert [v.device.type for v in moved.model_outputs] == ["meta", "meta"]
    assert [v.device.type for v in s.model_outputs] == ["cpu", "cpu"]
    assert type(moved.model_outputs) is list
    assert [v.device.type for v in moved.timestep_list] == ["cpu", "cpu"]  # 0-D: not latent-sized
    assert moved.timesteps.device.type == moved.sigmas.device.type == "cpu"


def test_moved_history_is_independent_of_the_original():
    """The copy steps on without changing the original: UniPC shifts its timestep_list in place at each step, so a
    shallow copy would rewrite the history of the stage it was handed from."""
    from pixart_core import stages

    s, x, g = _stepped_unipc()
    before = [t.clone() for t in s.timestep_list], [v.clone() for v in s.model_outputs]
    moved = stages.moved_history(s, torch.device("cpu"))
    moved.step(torch.randn(1, 4, 8, 8, generator=g), s.timesteps[2], x)
    assert [int(t) for t in s.timestep_list] == [int(t) for t in before[0]]
    assert all(torch.equal(a, b) for a, b in zip(s.model_outputs, before[1]))
    assert [int(t) for t in moved.timestep_list] != [int(t) for t in before[0]]  # the copy did step


def test_state_recognises_its_latents_within_float_rounding():
    """A stage's LATENT comes back to the next stage as it was handed, give or take a float's rounding (a round trip
    through another dtype or device): recognised; any real edit is not. Written-out values: 5e-7 off a zero is within
    rounding (below atol 1e-6), 1e-3 is an edit."""
    from pixart_core import stages

    handed = torch.zeros(1, 4, 8, 8)
    handed[0, 0, 0, :4] = torch.tensor([0.5, -1.25, 2.0, 0.75])  # exact in bf16
    state = stages.SolverState("dpmpp_2m", 10, 4, None, None, handed, None, handed, handed)
    assert state.continues("dpmpp_2m", 10, 4, handed + 5e-7)
    assert state.continues("dpmpp_2m", 10, 4, handed.to(torch.bfloat16))  # compared in the state's dtype
    assert not state.continues("dpmpp_2m", 10, 4, handed + 1e-3)
    assert not state.continues("dpmpp_2m", 10, 5, handed)


def test_stage_without_a_generator_hands_on_to_one_with_a_generator(dit_and_conds):
    """A deterministic solver's stage 1 run without a generator hands on no generator state; stage 2 given a
    generator (ComfyUI's KSamplerAdvanced always has a seed) continues it as one run without a generator."""
    dit, pos, neg = dit_and_conds
    kw = dict(steps=6, cfg=4.5, scheduler="dpmpp_2m")
    noise, _ = _noise()
    whole = sampling.sample(dit, pos, neg, noise, **kw)
    first, state = sampling.sample(dit, pos, neg, noise, end_step=3, leftover_noise=True, return_state=True, **kw)
    assert state.generator_state is None
    _, gen = _noise(seed=99)
    second = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=first, start_step=3, add_noise=False,
                             resume=state, **kw)
    assert torch.equal(second, whole)


def test_ddim_stage_from_step_0_without_noise_reads_comfyui_form(dit_and_conds):
    """A stage from step 0 with add_noise off takes its latent as ComfyUI keeps a noisy one, x0 + sigma * noise, at
    the schedule's first timestep: for DDIM's 6 linspace steps t = 999, where that is the solver's latent divided by
    sqrt(alphas_cumprod[999]) (the training schedule written out: linear betas 1e-4..0.02 over 1000 steps, float32 as
    diffusers builds them). So the solver's latent L given as L / sqrt(a) samples as a text-to-image run from L."""
    dit, pos, neg = dit_and_conds
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32)
    a = torch.cumprod(1.0 - betas, dim=0)[999]
    kw = dict(steps=6, cfg=4.5, scheduler="ddim")
    noise, _ = _noise()
    whole = sampling.sample(dit, pos, neg, noise, **kw)  # DDIM starts from the noise itself (init_noise_sigma 1)
    staged = sampling.sample(dit, pos, neg, noise, init_latents=noise / a.sqrt(), start_step=0, add_noise=False, **kw)
    assert (staged - whole).abs().max() <= 1e-4 * whole.abs().max()

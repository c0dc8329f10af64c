"""The sampling loop itself: ComfyUI's seed convention for the noise, the preview's clean estimate against the
scheduler's, the NaN/inf error (which step, which timestep, with and without a host sync per step) and the DMD
timestep reaching the model (and DMD's one step ignoring stage settings)."""
from __future__ import annotations

import pytest
import torch

import reference_settings as reference
from cases import noise as _noise
from harness import models as tiny
from pixart_core import sampling, schedulers
from pixart_core.conditioning import Conditioning


def test_preview_x0_is_the_schedulers_clean_estimate():
    """on_step's x0 equals DDIM's pred_original_sample for the same latents and epsilon (diffusers)."""
    torch.manual_seed(3)
    dit = tiny.make_dit()
    pos = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    neg = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    seen, previews = [], []

    def hook(module, args, kwargs, output):
        seen.append((args[0].clone(), kwargs["timestep"][0].clone(), output[0].clone()))

    handle = dit.register_forward_hook(hook, with_kwargs=True)
    noise, gen = sampling.initial_noise(1, 1, 4, 64, 64)
    try:
        sampling.sample(dit, pos, neg, noise, steps=3, cfg=3.0, scheduler="ddim", generator=gen,
                        on_step=lambda i, n, x0: previews.append(x0()))
    finally:
        handle.remove()
    ref = reference.scheduler("ddim")
    ref.set_timesteps(3)
    assert len(previews) == len(seen) == 3
    for (x, t, out), got in zip(seen, previews):
        uncond, cond = out[:, :4].chunk(2)
        eps = uncond + 3.0 * (cond - uncond)
        want = ref.step(eps, t, x[1:], return_dict=True).pred_original_sample
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("bad_call", [2, 3])
def test_nan_error_names_the_step_and_its_timestep(bad_call):
    """The message names the first step whose output is not finite and that step's timestep (the release scheduler's
    20-step schedule: diffusers)."""
    dit = tiny.make_dit()
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return (output[0] * float("nan"),) if len(calls) >= bad_call else output

    handle = dit.register_forward_hook(poison)
    ref = reference.scheduler("dpmpp_2m")
    ref.set_timesteps(20)
    cond = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    noise, gen = sampling.initial_noise(0, 1, 4, 32, 32)
    try:
        with pytest.raises(FloatingPointError) as e:
            sampling.sample(dit, cond, cond, noise, steps=20, cfg=4.5, generator=gen)
    finally:
        handle.remove()
    assert str(e.value) == (f"PixArt sampling produced NaN/inf at step {bad_call} of 20 (timestep "
                            f"{int(ref.timesteps[bad_call - 1])}). The model overflowed: lower cfg (now 4.5), load the "
                            "DiT in bf16 or fp32 instead of fp16, or check that the weights file is not corrupt.")


def test_nan_check_is_deferred_only_off_the_cpu():
    assert sampling.defers_nan_check(torch.device("cpu")) is False
    assert sampling.defers_nan_check(torch.device("cuda", 0)) is True
    assert sampling.defers_nan_check(torch.device("mps")) is True


def test_noise_follows_comfyui_seed_convention():
    noise, gen = sampling.initial_noise(2**64 - 1, 2, 4, 64, 32)
    want = torch.randn((2, 4, 8, 4), generator=torch.manual_seed(2**64 - 1))
    assert torch.equal(noise, want) and noise.shape == (2, 4, 8, 4)


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-each-step", "read-once-at-the-end"])
def test_nan_step_is_named_with_and_without_a_host_sync_per_step(monkeypatch, deferred):
    """NaN from the 2nd forward on: the error names step 2 either way. On the CPU the check stops at once; on a GPU
    (forced here) it keeps the first bad step on the device and reads it once after the loop (no sync per step)."""
    monkeypatch.setattr(sampling, "defers_nan_check", lambda device: deferred)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return (output[0] * float("nan"),) if len(calls) >= 2 else output

    dit = tiny.make_dit()
    handle = dit.register_forward_hook(poison)
    try:
        cond = Conditioning(torch.randn(1, 5, dit.config.caption_channels), torch.ones(1, 5, dtype=torch.long))
        noise, gen = sampling.initial_noise(0, 1, 4, 64, 64)
        with pytest.raises(FloatingPointError, match=r"NaN/inf at step 2 of 4 \(timestep \d+\)"):
            sampling.sample(dit, cond, cond, noise, steps=4, cfg=4.5, generator=gen)
    finally:
        handle.remove()
    assert len(calls) == (4 if deferred else 2)


@pytest.mark.parametrize("timestep", [reference.DMD_TIMESTEPS[0], 599])
def test_dmd_timestep_reaches_the_model(dit_and_conds, timestep):
    dit, pos, neg = dit_and_conds
    seen = []
    handle = dit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].tolist()), with_kwargs=True)
    try:
        noise, gen = _noise()
        kw = {} if timestep == reference.DMD_TIMESTEPS[0] else {"dmd_timestep": timestep}  # the default is the release's
        sampling.sample(dit, pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD, generator=gen, **kw)
    finally:
        handle.remove()
    assert seen == [[timestep, timestep]]


def test_dmd_runs_its_one_step_from_noise_whatever_the_stage_settings(dit_and_conds):
    """The Advanced sampler always sends stage settings (end step 10000, leftover noise...): DMD's one step from
    noise ignores them (the same latents as without them); a start from an input latent or part-way is refused."""
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    plain = sampling.sample(dit, pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD, generator=gen)
    noise, gen = _noise()
    staged = sampling.sample(dit, pos, neg, noise, steps=20, cfg=1.0, scheduler=schedulers.DMD, generator=gen,
                             end_step=12, leftover_noise=True)
    assert torch.equal(plain, staged)
    for kw in (dict(init_latents=noise), dict(init_latents=noise, start_step=2, add_noise=False)):
        with pytest.raises(ValueError, match="does not do img2img: it starts from noise"):
            sampling.sample(dit, pos, neg, noise, steps=20, cfg=1.0, scheduler=schedulers.DMD, **kw)


def test_check_inputs_refuses_exactly_what_cannot_run_and_says_what_to_change():
    """The one check of a request (before anything is loaded), at each boundary: DMD's one step starts from noise at a
    timestep of the 1000-step training schedule (0..999, diffusers' num_train_timesteps); a stage that starts
    part-way (start_step 1, or add_noise off) needs an input latent, as an inpainting mask does; the CFG interval lies
    in [0, 1]; denoise and start/end steps do not mix. Each refusal is the whole message a user reads."""
    from pixart_core.guidance import Guidance
    from pixart_core.request import Request, check_inputs

    dit = tiny.make_dit()
    cond = Conditioning(torch.zeros(1, 4, tiny.T5_WIDTH), torch.ones(1, 4, dtype=torch.long))
    latents = torch.zeros(1, 4, 8, 8)
    base = dict(positive=cond, negative=cond, width=64, height=64, steps=10, guidance=Guidance(4.5))

    def refused(message: str, **kw) -> None:
        with pytest.raises(ValueError) as e:
            check_inputs(Request(**{**base, **kw}), dit)
        assert str(e.value) == message

    for kw in (dict(), dict(scheduler=schedulers.DMD, steps=1, dmd_timestep=0),
               dict(scheduler=schedulers.DMD, steps=1, dmd_timestep=999), dict(init_latents=latents, start_step=1),
               dict(init_latents=latents, add_noise=False), dict(guidance=Guidance(4.5, cfg_start=0.0, cfg_end=1.0)),
               dict(guidance=Guidance(4.5, cfg_start=0.5, cfg_end=0.5)), dict(init_latents=latents, mask=latents)):
        check_inputs(Request(**{**base, **kw}), dit)
    dmd = ("The one-step DMD sampler does not do img2img: it starts from noise (an Empty Latent Image; add_noise "
           "enable and start_step 0 in the Advanced sampler). Pick another scheduler for img2img.")
    for kw in (dict(init_latents=latents), dict(start_step=1), dict(add_noise=False)):
        refused(dmd, scheduler=schedulers.DMD, steps=1, **kw)
    for t in (-1, 1000):
        refused(f"DMD timestep {t} is outside the schedule's 0-999 (the release uses 400).", scheduler=schedulers.DMD,
                steps=1, dmd_timestep=t)
    refused(f"Unknown scheduler 'heun'; choose one of {list(reference.SCHEDULERS)}.", scheduler="heun")
    refused("PixArt sampler: denoise and start/end steps both choose the part of the schedule to run; use one of them "
            "(denoise 1.0 with start/end steps).", init_latents=latents, end_step=5, denoise=0.5)
    refused("PixArt sampler: start_step 10 to end_step 10 of 10 steps runs no step; start_step must be below end_step "
            "and below steps.", init_latents=latents, start_step=10)
    refused("PixArt sampler: the inpainting mask needs the image's latent; connect 'latent' (VAE Encode of the image, "
            "or Set Latent Noise Mask's output).", mask=latents)
    for kw in (dict(start_step=1), dict(add_noise=False)):
        refused("PixArt sampler: a stage that starts part-way (start_step > 0 or add_noise off) continues an input "
                "latent; connect one.", **kw)
    for start, end in ((0.0, 1.01), (-0.1, 0.5), (0.6, 0.5)):
        refused(f"PixArt sampler: the CFG interval [{start}, {end}] must lie in [0, 1] with cfg_start <= cfg_end.",
                guidance=Guidance(4.5, cfg_start=start, cfg_end=end))


def test_size_refusal_names_the_side_the_noise_gives():
    """The canvas is the noise's size (8 px per latent value): a side past the largest trained one (4096, the 2K
    bins) is refused by name, width from the last dimension, height from the one before."""
    dit = tiny.make_dit()
    cond = Conditioning(torch.randn(1, 5, tiny.T5_WIDTH), torch.ones(1, 5, dtype=torch.long))
    for shape, message in (((1, 4, 8, 520), "width 4160"), ((1, 4, 520, 8), "height 4160")):
        with pytest.raises(ValueError) as e:
            sampling.sample(dit, cond, cond, torch.zeros(shape), steps=1, cfg=4.5)
        assert str(e.value) == f"PixArt sampler: {message} is outside 16..4096."


def test_half_precision_noise_is_sampled_in_fp32(dit_and_conds):
    """The loop runs in fp32 whatever the noise's dtype (the pipeline makes its latents in fp32 and the DiT casts
    them): bf16 noise gives exactly the latents of the same values in fp32, and fp32 latents come back. Euler scales
    the noise by its init sigma (157.4), a product bf16 would round."""
    dit, pos, neg = dit_and_conds
    noise, _ = _noise()
    half = noise.to(torch.bfloat16)
    a = sampling.sample(dit, pos, neg, half, steps=3, cfg=4.5, scheduler="euler")
    b = sampling.sample(dit, pos, neg, half.float(), steps=3, cfg=4.5, scheduler="euler")
    assert a.dtype == torch.float32 and torch.equal(a, b)

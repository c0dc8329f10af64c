"""Issue 16 in the sampling loop: inpainting, PAG / CFG rescale / CFG interval, staged sampling, the DMD timestep.
References: diffusers' PixArtSigmaPAGPipeline and rescale_noise_cfg, diffusers schedulers built from the release's
published settings (tests/reference_settings.py), ComfyUI's prepare_mask, and hand computations."""
from __future__ import annotations

import copy

import pytest
import torch

import reference_settings as reference
from harness import models as tiny
from pixart_core import guidance, inpaint, sampling, schedulers
from pixart_core.conditioning import Conditioning

SIZE = 64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(3)
    pos = Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] * 9 + [0] * 3]))
    neg = Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] + [0] * 11]))
    return tiny.make_dit(), pos, neg


def _noise(seed=11, batch=2):
    return sampling.initial_noise(seed, batch, 4, SIZE, SIZE)


def _reference_loop(dit, pos, neg, noise, steps, cfg, name, *, stop=None, rescale=0.0):
    """The diffusers pipeline's loop written out (PixArtSigmaPipeline + StableDiffusionPipeline's guidance_rescale),
    on a scheduler from the published settings; returns the latents and the last step's scheduler output."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    sch = reference.scheduler(name)
    sch.set_timesteps(steps)
    b = noise.shape[0]
    lat = noise * sch.init_noise_sigma
    emb = torch.cat([neg.embeds.repeat(b, 1, 1), pos.embeds.repeat(b, 1, 1)])
    msk = torch.cat([neg.mask.repeat(b, 1), pos.mask.repeat(b, 1)])
    res = None
    with torch.no_grad():
        for t in sch.timesteps[:stop]:
            x = sch.scale_model_input(torch.cat([lat] * 2), t)
            out = dit(x, encoder_hidden_states=emb, encoder_attention_mask=msk, timestep=t[None].expand(2 * b),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            u, c = out.chunk(2)
            guided, c = (u + cfg * (c - u)).chunk(2, dim=1)[0], c.chunk(2, dim=1)[0]
            if rescale:
                guided = rescale_noise_cfg(guided, c, guidance_rescale=rescale)
            res = sch.step(guided, t, lat)
            lat = res.prev_sample
    return lat, res, sch


# --- inpainting --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_shape,latent_shape", [((64, 96), (1, 4, 8, 12)), ((2, 37, 51), (2, 4, 8, 12)),
                                                     ((1, 1, 40, 40), (3, 4, 5, 5)), ((3, 24, 24), (2, 4, 6, 6))])
def test_mask_is_resized_as_comfyui_prepare_mask(comfy, mask_shape, latent_shape):
    import comfy.sampler_helpers

    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(0))
    want = comfy.sampler_helpers.prepare_mask(mask, latent_shape, "cpu")
    got = inpaint.latent_mask(mask, latent_shape)
    assert got.shape == want.shape == latent_shape and torch.equal(got, want)


def _box_mask(batch=2):
    m = torch.zeros(batch, 1, SIZE // 8, SIZE // 8)
    m[:, :, 2:6, 1:5] = 1.0
    return m


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_inpainting_keeps_the_image_outside_the_mask(setup, name):
    """Outside the mask: the image, re-noised to the timestep a stage stops at (diffusers' add_noise on the
    published scheduler: a hand-checkable closed form), and the image itself at the end of the schedule."""
    dit, pos, neg = setup
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


def test_all_ones_mask_is_plain_img2img(setup):
    dit, pos, neg = setup
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    for denoise in (1.0, 0.5):
        noise, gen = _noise()
        plain = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, init_latents=init, denoise=denoise, generator=gen)
        noise, gen = _noise()
        ones = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, init_latents=init, denoise=denoise,
                               generator=gen, mask=torch.ones(1, 1, SIZE, SIZE))
        assert torch.equal(plain, ones)


def test_mask_without_latent_is_refused(setup):
    dit, pos, neg = setup
    noise, gen = _noise()
    with pytest.raises(ValueError, match="inpainting mask needs the image's latent"):
        sampling.sample(dit, pos, neg, noise, steps=2, cfg=4.5, mask=_box_mask())


# --- guidance ----------------------------------------------------------------------------------------------------

def _cast_copy(dit):
    """The DiT as the pack runs it: ComfyUI's cast-weights layers (the pack's nodes/comfy/loading.castable, as ComfyUI
    loaded it)."""
    import sys

    management = next(m for name, m in sys.modules.items() if name.endswith("nodes.comfy.loading")
                      and hasattr(m, "castable"))
    model = management.castable(copy.deepcopy(dit))
    assert any(getattr(m, "comfy_cast_weights", None) is not None for m in model.modules())
    return model


@pytest.mark.parametrize("cfg", [4.5, 1.0])
@pytest.mark.parametrize("layers", ["blocks.1", "blocks.(0|1)"])
def test_pag_matches_diffusers_pag_pipeline(comfy, setup, cfg, layers):
    from diffusers import PixArtSigmaPAGPipeline

    dit, pos, neg = setup
    ours_model = _cast_copy(dit)
    before = dict(ours_model.attn_processors)
    noise, gen = _noise()
    ours = sampling.sample(ours_model, pos, neg, noise, steps=4, cfg=cfg, generator=gen, pag_scale=3.0,
                           pag_layers=layers)
    assert {k: id(v) for k, v in ours_model.attn_processors.items()} == {k: id(v) for k, v in before.items()}

    pipe = PixArtSigmaPAGPipeline(tokenizer=None, text_encoder=None, vae=tiny.make_vae(), transformer=dit,
                                  scheduler=reference.scheduler(schedulers.DEFAULT), pag_applied_layers=layers)
    ref = pipe(prompt=None, negative_prompt=None, prompt_embeds=pos.embeds, prompt_attention_mask=pos.mask, negative_prompt_embeds=neg.embeds,
               negative_prompt_attention_mask=neg.mask, num_images_per_prompt=2, latents=noise.clone(),
               num_inference_steps=4, guidance_scale=cfg, pag_scale=3.0, height=SIZE, width=SIZE,
               output_type="latent", use_resolution_binning=False).images
    noise, gen = _noise()
    plain = sampling.sample(dit, pos, neg, noise, steps=4, cfg=cfg, generator=gen)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-2  # PAG changed the result


def test_pag_layers_are_the_ones_diffusers_picks():
    from diffusers import PixArtSigmaPAGPipeline
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    dit = tiny.make_dit(layers=12)
    names = {id(m): n for n, m in dit.named_modules()}
    for spec, patterns in [("blocks.1", ["blocks.1"]), ("blocks.11", ["blocks.11"]), ("blocks.(2|7)", ["blocks.(2|7)"]),
                           ("blocks.3, blocks.10", ["blocks.3", "blocks.10"])]:
        model = copy.deepcopy(dit)
        pipe = PixArtSigmaPAGPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None,
                                      pag_applied_layers=patterns)
        pipe._set_pag_attn_processor(pipe.pag_applied_layers, do_classifier_free_guidance=True)
        want = sorted(n for n, m in model.named_modules()
                      if isinstance(getattr(m, "processor", None), PAGCFGIdentitySelfAttnProcessor2_0))
        got = sorted(names[id(m)] for m in guidance.pag_targets(dit, guidance.pag_layer_patterns(spec)))
        assert got == want and got, spec
    with pytest.raises(ValueError, match="blocks.0 to blocks.11"):
        guidance.pag_targets(dit, ["blocks.40"])


def test_pag_processors_come_back_after_cancel(setup):
    dit, pos, neg = setup
    before = {k: id(v) for k, v in dit.attn_processors.items()}

    def cancel(step, total, x0):
        raise InterruptedError("cancelled")

    noise, gen = _noise()
    with pytest.raises(InterruptedError):
        sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, generator=gen, pag_scale=2.0, pag_layers="blocks.1",
                        on_step=cancel)
    assert {k: id(v) for k, v in dit.attn_processors.items()} == before


def test_guidance_rescale_as_diffusers(setup):
    dit, pos, neg = setup
    noise, gen = _noise()
    ours = sampling.sample(dit, pos, neg, noise, steps=4, cfg=7.0, generator=gen, guidance_rescale=0.7)
    ref, _, _ = _reference_loop(dit, pos, neg, noise, 4, 7.0, schedulers.DEFAULT, rescale=0.7)
    plain, _, _ = _reference_loop(dit, pos, neg, noise, 4, 7.0, schedulers.DEFAULT)
    assert (ours - ref).abs().max() <= 1e-4 and (ours - plain).abs().max() > 1e-3


def _batch_sizes(dit):
    sizes = []
    handle = dit.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    return sizes, handle


def test_cfg_interval_runs_one_pass_outside_it(setup):
    dit, pos, neg = setup
    sizes, handle = _batch_sizes(dit)
    try:
        noise, gen = _noise(batch=1)
        sampling.sample(dit, pos, neg, noise, steps=10, cfg=4.5, generator=gen, cfg_start=0.2, cfg_end=0.6)
        # steps 2, 3, 4, 5 start at 0.2 ... 0.5 of the schedule: [uncond, cond]; the others cond only
        assert sizes == [1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
        sizes.clear()
        sampling.sample(dit, pos, neg, noise, steps=10, cfg=4.5, generator=gen, cfg_start=0.5, cfg_end=1.0,
                        pag_scale=1.0, pag_layers="blocks.0")
        assert sizes == [2] * 5 + [3] * 5  # PAG adds its perturbed pass on every step
    finally:
        handle.remove()
    noise, gen = _noise()
    plain = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, generator=gen)
    noise, gen = _noise()
    whole = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, generator=gen, cfg_start=0.0, cfg_end=1.0)
    noise, gen = _noise()
    none = sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, generator=gen, cfg_start=0.5, cfg_end=0.5)
    noise, gen = _noise()
    cfg1 = sampling.sample(dit, pos, neg, noise, steps=4, cfg=1.0, generator=gen)
    assert torch.equal(plain, whole) and torch.equal(none, cfg1)


# --- staged sampling ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpmpp_2m", "sa_solver", "unipc", "euler_ancestral", "ddpm", "ddim"])
def test_two_stages_equal_one_run(setup, name):
    """Stage 1 stops with leftover noise and hands its solver state on in the LATENT; stage 2 continues: the same
    latents as one run, bit for bit, for multistep (history) and stochastic (generator) schedulers alike."""
    dit, pos, neg = setup
    noise, gen = _noise()
    whole = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen)
    noise, gen = _noise()
    first, state = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen,
                                   end_step=4, leftover_noise=True, return_state=True)
    noise, gen = _noise(seed=99)  # stage 2's own seed: its noise is not added (add_noise off)
    second = sampling.sample(dit, pos, neg, noise, steps=7, cfg=4.5, scheduler=name, generator=gen,
                             init_latents=first, start_step=4, add_noise=False, resume=state)
    assert torch.equal(second, whole)


def test_two_inpainting_stages_equal_one_inpainting_run(setup):
    """The state also carries the image and noise that stage 2 keeps re-noising outside the mask."""
    dit, pos, neg = setup
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


def test_stage_two_without_the_state_restarts_the_solver(setup):
    """Without the state (e.g. the LATENT went through a file), stage 2 restarts as KSamplerAdvanced does: the
    first-order deterministic DDIM still gives one run's result; DPM-Solver++ 2M's first step is then first order."""
    dit, pos, neg = setup
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


def test_early_stop_returns_the_clean_estimate_or_comfyui_leftover(setup):
    """end_step < steps: without leftover noise the stage jumps to the step's clean estimate (KSamplerAdvanced sets
    the last sigma to 0: DDIM's pred_original_sample); with it, ComfyUI's form x0 + sigma * noise = x_t / sqrt(a_t)."""
    dit, pos, neg = setup
    noise, gen = _noise()
    ref_x, res, sch = _reference_loop(dit, pos, neg, noise, 6, 4.5, "ddim", stop=4)
    clean = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler="ddim", generator=gen, end_step=4)
    assert (clean - res.pred_original_sample).abs().max() <= 1e-4
    leftover = sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, scheduler="ddim", generator=gen,
                               end_step=4, leftover_noise=True)
    a = sch.alphas_cumprod[int(sch.timesteps[3]) - 1000 // 6]  # diffusers' DDIM steps to t - 1000 // steps
    assert (leftover - ref_x / a.sqrt()).abs().max() <= 1e-4


def test_stage_arguments_are_checked(setup):
    dit, pos, neg = setup
    noise, gen = _noise()
    with pytest.raises(ValueError, match="runs no step"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, end_step=3, start_step=3, init_latents=noise)
    with pytest.raises(ValueError, match="continues an input latent"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, start_step=2)
    with pytest.raises(ValueError, match="use one of them"):
        sampling.sample(dit, pos, neg, noise, steps=6, cfg=4.5, end_step=3, init_latents=noise, denoise=0.5)


# --- one-step models ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timestep", [reference.DMD_TIMESTEPS[0], 599])
def test_dmd_timestep_reaches_the_model(setup, timestep):
    dit, pos, neg = setup
    seen = []
    handle = dit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].tolist()), with_kwargs=True)
    try:
        noise, gen = _noise()
        kw = {} if timestep == reference.DMD_TIMESTEPS[0] else {"dmd_timestep": timestep}  # the default is the release's
        sampling.sample(dit, pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD, generator=gen, **kw)
    finally:
        handle.remove()
    assert seen == [[timestep, timestep]]


def test_dmd_runs_its_one_step_from_noise_whatever_the_stage_settings(setup):
    """The Advanced sampler always sends stage settings (end step 10000, leftover noise...): DMD's one step from
    noise ignores them (the same latents as without them); a start from an input latent or part-way is refused."""
    dit, pos, neg = setup
    noise, gen = _noise()
    plain = sampling.sample(dit, pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD, generator=gen)
    noise, gen = _noise()
    staged = sampling.sample(dit, pos, neg, noise, steps=20, cfg=1.0, scheduler=schedulers.DMD, generator=gen,
                             end_step=12, leftover_noise=True)
    assert torch.equal(plain, staged)
    for kw in (dict(init_latents=noise), dict(init_latents=noise, start_step=2, add_noise=False)):
        with pytest.raises(ValueError, match="does not do img2img: it starts from noise"):
            sampling.sample(dit, pos, neg, noise, steps=20, cfg=1.0, scheduler=schedulers.DMD, **kw)

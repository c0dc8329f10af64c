"""Guidance in the sampling loop: CFG's DiT passes per step, PAG against diffusers' PixArtSigmaPAGPipeline (the layers
it picks, its processors restored), CFG rescale against diffusers' rescale_noise_cfg, and the CFG interval."""
from __future__ import annotations

import copy

import pytest
import torch

from cases import SIZE
from cases import noise as _noise
from cases import pipeline_loop as _reference_loop
from cases import record_calls as _record_calls
from harness import models as tiny
from pixart_core import guidance, sampling, schedulers


@pytest.mark.parametrize("cfg,passes_per_image", [(1.0, 1), (0.5, 1), (0.0, 1), (1.01, 2), (4.5, 2)])
def test_dit_passes_per_step_follow_cfg(conds, cfg, passes_per_image):
    """cfg <= 1 runs no negative pass (as diffusers: guidance only when guidance_scale > 1): one DiT forward per step
    over the batch; cfg > 1 one forward over [negative, positive]."""
    pos, neg = conds
    dit = tiny.make_dit()
    calls, handle = _record_calls(dit)
    noise, gen = sampling.initial_noise(5, 2, 4, SIZE, SIZE)
    try:
        sampling.sample(dit, pos, neg, noise, steps=4, cfg=cfg, generator=gen)
    finally:
        handle.remove()
    assert [x.shape[0] for x, _ in calls] == [2 * passes_per_image] * 4


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


def test_pag_processors_come_back_after_cancel(dit_and_conds):
    dit, pos, neg = dit_and_conds
    before = {k: id(v) for k, v in dit.attn_processors.items()}

    def cancel(step, total, x0):
        raise InterruptedError("cancelled")

    noise, gen = _noise()
    with pytest.raises(InterruptedError):
        sampling.sample(dit, pos, neg, noise, steps=4, cfg=4.5, generator=gen, pag_scale=2.0, pag_layers="blocks.1",
                        on_step=cancel)
    assert {k: id(v) for k, v in dit.attn_processors.items()} == before


def test_guidance_rescale_as_diffusers(dit_and_conds):
    dit, pos, neg = dit_and_conds
    noise, gen = _noise()
    ours = sampling.sample(dit, pos, neg, noise, steps=4, cfg=7.0, generator=gen, guidance_rescale=0.7)
    ref, _, _ = _reference_loop(dit, pos, neg, noise, 4, 7.0, schedulers.DEFAULT, rescale=0.7)
    plain, _, _ = _reference_loop(dit, pos, neg, noise, 4, 7.0, schedulers.DEFAULT)
    assert (ours - ref).abs().max() <= 1e-4 and (ours - plain).abs().max() > 1e-3


def _batch_sizes(dit):
    sizes = []
    handle = dit.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    return sizes, handle


def test_cfg_interval_runs_one_pass_outside_it(dit_and_conds):
    dit, pos, neg = dit_and_conds
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


def test_cfg_interval_counts_steps_of_the_whole_schedule_in_img2img_and_stages(dit_and_conds):
    """The interval is a part of the whole schedule, whatever part of it a run steps through; a forward pre-hook
    counts the batch per step (1: positive only, 2: negative and positive). By hand, 10 steps:
    img2img with denoise 0.6 runs steps 4..9 (int(10 * 0.6) = 6 of them); [0.5, 0.8) holds the steps starting at
    0.5, 0.6, 0.7 of the schedule: steps 5, 6, 7 -> batches 1, 2, 2, 2, 1, 1.
    A stage over steps 3..7 with [0.2, 0.5): steps 3, 4 (0.3, 0.4) -> 2, 2, 1, 1, 1; the stage continuing it over
    steps 8, 9 with [0.8, 1.0): both (0.8, 0.9) -> 2, 2; with [0.2, 0.5) neither -> 1, 1."""
    dit, pos, neg = dit_and_conds
    sizes, handle = _batch_sizes(dit)
    image = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    try:
        noise, gen = _noise(batch=1)
        sampling.sample(dit, pos, neg, noise, steps=10, cfg=4.5, generator=gen, init_latents=image, denoise=0.6,
                        cfg_start=0.5, cfg_end=0.8)
        assert sizes == [1, 2, 2, 2, 1, 1]
        stage = dict(steps=10, cfg=4.5, scheduler="dpmpp_2m")
        sizes.clear()
        noise, gen = _noise(batch=1)
        first, state = sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=image, start_step=3,
                                       end_step=8, leftover_noise=True, return_state=True, cfg_start=0.2, cfg_end=0.5,
                                       **stage)
        assert sizes == [2, 2, 1, 1, 1]
        for (start, end), want in (((0.8, 1.0), [2, 2]), ((0.2, 0.5), [1, 1])):
            sizes.clear()
            sampling.sample(dit, pos, neg, noise, generator=gen, init_latents=first, start_step=8, add_noise=False,
                            resume=state, cfg_start=start, cfg_end=end, **stage)
            assert sizes == want
    finally:
        handle.remove()

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


def _diffusers_pag(pag_scale: float):
    """diffusers' PAGMixin as its pipelines use it, with a fixed PAG scale (no adaptive scaling)."""
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class Pag(PAGMixin):
        pass

    p = Pag()
    p._pag_scale, p._pag_adaptive_scale = pag_scale, 0.0
    return p


@pytest.mark.parametrize("use_cfg,pag_scale,batch", [(True, 0.5, 4), (False, 0.5, 3), (True, 3.0, 1),
                                                     (False, 0.0, 2), (True, 0.0, 2)])
def test_combined_prediction_is_diffusers_guidance(use_cfg, pag_scale, batch):
    """One forward's batch ([uncond,] cond[, perturbed], `batch` images each) into the guided prediction, as
    diffusers' PAGMixin._apply_perturbed_attention_guidance (with PAG) or its pipelines' CFG line (without) compute
    it: PAG scales below 1 included, several images per part."""
    parts = (2 if use_cfg else 1) + (1 if pag_scale > 0 else 0)
    out = torch.randn(parts * batch, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    g = guidance.Guidance(cfg=4.5, pag_scale=pag_scale)
    got = guidance.combine(out, use_cfg, g, learned_sigma=False)
    if pag_scale > 0:
        want = _diffusers_pag(pag_scale)._apply_perturbed_attention_guidance(out, use_cfg, 4.5, 999)
    elif use_cfg:
        uncond, text = out.chunk(2)
        want = uncond + 4.5 * (text - uncond)  # diffusers' PixArtSigmaPipeline.__call__
    else:
        want = out
    assert got.shape == (batch, 4, 6, 6) and torch.allclose(got, want, rtol=0, atol=1e-6)


def test_pag_layers_by_attention_name_are_the_ones_diffusers_picks():
    """Patterns naming the attention itself ('attn1'), and a model whose self-attentions are named by a number (a
    ModuleList of them: 'blocks.1' then matches blocks.1 and blocks.10, and diffusers leaves out the one whose last
    number equals the pattern's, so 'blocks.10' matches none): the modules diffusers'
    PAGMixin._set_pag_attn_processor sets."""
    from diffusers.models.attention_processor import Attention, PAGCFGIdentitySelfAttnProcessor2_0

    class Numbered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Attention(8, heads=1, dim_head=8) for _ in range(12))

    class Nested(torch.nn.Module):  # stage.blocks.N: the name's second part is not its last
        def __init__(self):
            super().__init__()
            self.stage = Numbered()

    for model, specs in [(tiny.make_dit(layers=3), ["attn1", "blocks.1.attn1", "1.attn"]),
                         (Numbered(), ["blocks.1", "1", "blocks"]), (Nested(), ["blocks.1", "1"])]:
        names = {id(m): n for n, m in model.named_modules()}
        for spec in specs:
            ref = copy.deepcopy(model)
            pag = _diffusers_pag(1.0)
            pag.transformer = ref
            pag.set_pag_applied_layers([spec])
            pag._set_pag_attn_processor(pag.pag_applied_layers, do_classifier_free_guidance=True)
            want = sorted(n for n, m in ref.named_modules()
                          if isinstance(getattr(m, "processor", None), PAGCFGIdentitySelfAttnProcessor2_0))
            got = sorted(names[id(m)] for m in guidance.pag_targets(model, [spec]))
            assert got == want and got, spec
    with pytest.raises(ValueError, match="no self-attention layer matches 'blocks.10'"):
        guidance.pag_targets(Numbered(), ["blocks.10"])  # diffusers: "Cannot find PAG layer" (its only match left out)


def test_pag_without_layers_is_refused():
    with pytest.raises(ValueError) as e:
        guidance.pag_targets(tiny.make_dit(layers=2), guidance.pag_layer_patterns(" , "))
    assert str(e.value) == "PAG needs the layers to perturb, e.g. 'blocks.14' (or set pag_scale to 0)."


def test_cfg_rescale_runs_only_with_cfg_and_a_positive_rescale():
    """As diffusers' PixArt pipelines (`if do_classifier_free_guidance and guidance_rescale > 0`): without CFG the
    prediction is the conditional one bit for bit, whatever the rescale; with rescale 0 a flat prediction (std 0,
    where the rescale would divide by zero) comes back as CFG made it."""
    out = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    got = guidance.combine(out[:1], False, guidance.Guidance(cfg=1.0, guidance_rescale=0.7), learned_sigma=False)
    assert torch.equal(got, out[:1])
    flat = torch.cat([torch.full((1, 4, 6, 6), 0.25), torch.full((1, 4, 6, 6), 0.5)])
    got = guidance.combine(flat, True, guidance.Guidance(cfg=3.0, guidance_rescale=0.0), learned_sigma=False)
    assert torch.equal(got, torch.full((1, 4, 6, 6), 0.25 + 3.0 * 0.25))


def test_cfg_runs_on_the_whole_schedule_by_default():
    """cfg_active's default interval is [0, 1): every step of the schedule, the first and the last."""
    assert [guidance.cfg_active(s, 10, 4.5) for s in (0, 9)] == [True, True]
    assert not guidance.cfg_active(0, 10, 1.0)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_text_batch_micro_conditions_are_the_pipelines(device):
    """The forward's micro-conditions for a micro-conditioned DiT, as diffusers' PixArtSigmaPipeline builds them:
    resolution [[height, width]] and aspect_ratio [[height / width]] in pixels, one row per image of the batch
    (negative then positive), in the embeddings' dtype, on the latents' device; an all-real mask is dropped (it would
    mask nothing), a padded one kept there."""
    from types import SimpleNamespace

    from pixart_core.conditioning import Conditioning

    x = torch.zeros(2, 4, 16, 24, device=device)  # 128 x 192 px
    full = Conditioning(torch.ones(1, 5, 8), torch.ones(1, 5, dtype=torch.long))
    padded = Conditioning(torch.ones(1, 5, 8), torch.tensor([[1, 1, 1, 0, 0]]))
    micro = SimpleNamespace(use_additional_conditions=True)
    embeds, mask, added = guidance._text_batch(micro, [full, full], x, torch.bfloat16)
    assert mask is None and embeds.shape == (4, 5, 8) and embeds.device.type == device
    want_res = torch.tensor([128, 192]).repeat(4, 1).to(torch.bfloat16)  # PixArtSigmaPipeline.__call__
    want_ar = torch.tensor([float(128 / 192)]).repeat(4, 1).to(torch.bfloat16)
    for got, want in ((added["resolution"], want_res), (added["aspect_ratio"], want_ar)):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape and got.device.type == device
        if device == "cpu":
            assert torch.equal(got, want)
    _, mask, _ = guidance._text_batch(micro, [padded, full], x, torch.bfloat16)
    assert mask is not None and mask.device.type == device
    if device == "cpu":
        assert mask.tolist() == [[1, 1, 1, 0, 0]] * 2 + [[1] * 5] * 2

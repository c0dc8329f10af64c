"""The bridge: our DiT as ComfyUI's MODEL and our T5 conditioning as ComfyUI's CONDITIONING, driven by
ComfyUI's own KSampler / sample_custom / LoraLoaderModelOnly / UNETLoader in this process (the real executor)."""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import models as tiny
from reference_settings import SIGMA_SCHEDULER_CONFIG
from harness.graphs import DIT_FILE
from harness.lora_files import write_comfy_keymap_lora as _lora_file

PROMPT = "a red fox in the snow"


def _node(comfy, node_id):
    return comfy.NODE_CLASS_MAPPINGS[node_id]


def _bridge(comfy):
    import sys

    return sys.modules[_node(comfy, "PixArtSigmaDiTToModel").__module__]


def _handle(comfy, variant: str, seed: int = 0, size: str = "tiny", **overrides):
    """A DiT handle as our loader makes it (ModelPatcher around the diffusers model), and an untouched copy."""
    import sys

    types = sys.modules[_bridge(comfy).__name__.rsplit(".", 1)[0] + ".types"]
    management = sys.modules[_bridge(comfy).__name__.rsplit(".", 1)[0] + ".comfy.loading"]
    from pixart_core.variants import PRESETS

    dit = tiny.make_dit(size, variant=variant, seed=seed, **overrides)
    ref = copy.deepcopy(dit)
    patcher = management.wrap(dit, torch.device("cpu"), torch.device("cpu"))
    return types.DiTHandle(patcher, PRESETS[variant], f"tiny-{variant}", "test"), ref


def _eps(ref, x, t, ctx, mask=None):
    """diffusers' epsilon for VP-scaled input x at integer timesteps t (micro-conditioning as the pipeline)."""
    h, w = x.shape[-2] * 8, x.shape[-1] * 8
    added = {"resolution": None, "aspect_ratio": None}
    if ref.use_additional_conditions:
        added = {"resolution": torch.tensor([[h, w]], dtype=torch.float32).repeat(x.shape[0], 1),
                 "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32).repeat(x.shape[0], 1)}
    with torch.no_grad():
        out = ref(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added,
                  return_dict=False)[0]
    return out[:, :4]


# ------------------------------------------------------------------------------------------------ the MODEL bridge

def test_original_layout_matches_comfyui_key_map(comfy):
    """Our diffusers -> original conversion puts every tensor where ComfyUI's own map (comfy.utils.pixart_to_diffusers,
    which its LoRA loader uses) says it lives, fused rows included."""
    from comfy.utils import pixart_to_diffusers

    from pixart_core import transformer as core_dit

    sd = tiny.make_dit(variant="alpha-1024").state_dict()  # with the micro-conditioning embedders
    width = sd["pos_embed.proj.weight"].shape[0]
    orig = core_dit.to_original(sd, 120)
    key_map = pixart_to_diffusers({"depth": 2, "hidden_size": width})
    assert set(key_map) - {"caption_projection.y_embedding"} == set(sd)
    for dkey, target in key_map.items():
        if dkey == "caption_projection.y_embedding":
            continue
        if isinstance(target, tuple):
            okey, (dim, start, size) = target
            assert torch.equal(orig[okey].narrow(dim, start, size), sd[dkey]), dkey
        else:
            assert torch.equal(orig[target], sd[dkey]), dkey
    assert orig["y_embedder.y_embedding"].shape == (120, tiny.T5_WIDTH) and not orig["y_embedder.y_embedding"].any()
    assert set(orig) == {t[0] if isinstance(t, tuple) else t for t in key_map.values()}


@pytest.mark.parametrize("variant", ["sigma-256", "sigma-512", "sigma-1024", "sigma-2k", "alpha-256", "alpha-512",
                                     "alpha-1024"])
def test_bridged_model_forward_equals_our_dit(comfy, variant):
    """One ComfyUI apply_model of the bridged MODEL (its sigma -> timestep, input scaling, extra conds incl. α's
    resolution/aspect-ratio) gives diffusers' epsilon of the same DiT to 1e-5 (fp32), at the trained-size-free
    small sizes where ComfyUI's own PixArt divides by zero, and off-square."""
    handle, ref = _handle(comfy, variant)
    model = _bridge(comfy).to_model(handle)
    from comfy.model_base import PixArt

    assert isinstance(model.model, PixArt)
    ms = model.model.model_sampling
    for h, w in ((8, 8), (12, 16), (32, 24)):
        torch.manual_seed(1)
        x = torch.randn(2, 4, h, w)
        ctx = torch.randn(1, 7, tiny.T5_WIDTH)
        t = torch.tensor([999, 421])
        sigma = ms.sigma(t.float())
        conds = model.model.extra_conds(cross_attn=ctx, width=w * 8, height=h * 8, device=torch.device("cpu"))
        kwargs = {k: v.process_cond(batch_size=2, device="cpu", area=None).cond for k, v in conds.items()}
        with torch.no_grad():
            denoised = model.model.apply_model(x * (sigma[:, None, None, None] ** 2 + 1) ** 0.5, sigma, **kwargs)
        eps = (x * (sigma[:, None, None, None] ** 2 + 1) ** 0.5 - denoised) / sigma[:, None, None, None]
        want = _eps(ref, x, t, ctx.repeat(2, 1, 1))
        assert (eps - want).abs().max() <= 1e-5, (variant, h, w, (eps - want).abs().max())


@pytest.mark.parametrize("layout", [dict(out_channels=4), dict(patch_size=1), dict(in_channels=8, out_channels=16)],
                         ids=["no-sigma-channels", "patch-1", "8-channels"])
def test_bridged_model_takes_its_layout_from_the_dit_not_comfyuis_defaults(comfy, layout):
    """ComfyUI's PixArtMS defaults to the released layout (patch 2, 4 channels in, 8 out: the learned sigma); a DiT
    built otherwise (diffusers' PixArtTransformer2DModel accepts any) still bridges to a MODEL whose epsilon is
    diffusers' (fp32, to 1e-5)."""
    import sys

    from diffusers import PixArtTransformer2DModel

    from pixart_core.variants import PRESETS

    base = _bridge(comfy).__name__.rsplit(".", 1)[0]
    types, management = sys.modules[base + ".types"], sys.modules[base + ".comfy.loading"]
    torch.manual_seed(0)
    dit = PixArtTransformer2DModel(**{**tiny.dit_config(), **layout}).eval()
    ref = copy.deepcopy(dit)
    cpu = torch.device("cpu")
    handle = types.DiTHandle(management.wrap(dit, cpu, cpu), PRESETS["sigma-1024"], "tiny-odd", "test")
    model = _bridge(comfy).to_model(handle)
    channels = dit.config.in_channels
    torch.manual_seed(1)
    x, ctx, t = torch.randn(2, channels, 8, 8), torch.randn(1, 7, tiny.T5_WIDTH), torch.tensor([999, 421])
    sigma = model.model.model_sampling.sigma(t.float())[:, None, None, None]
    conds = model.model.extra_conds(cross_attn=ctx, width=64, height=64, device=cpu)
    kwargs = {k: v.process_cond(batch_size=2, device="cpu", area=None).cond for k, v in conds.items()}
    with torch.no_grad():
        denoised = model.model.apply_model(x * (sigma ** 2 + 1) ** 0.5, sigma[:, 0, 0, 0], **kwargs)
    eps = (x * (sigma ** 2 + 1) ** 0.5 - denoised) / sigma
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx.repeat(2, 1, 1), timestep=t, return_dict=False,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})[0][:, :channels]
    assert (eps - want).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", ["alpha-512", "sigma-1024"])
def test_bridged_model_is_comfyuis_model_of_its_family(comfy, variant, caplog):
    """PixArt-α bridges as ComfyUI's PixArtAlpha (the SD 1.x latent format), PixArt-Σ as its PixArtSigma (SDXL's):
    KSampler scales latents by the family's format. The log line says what was built, whole."""
    import logging

    import comfy.supported_models as models

    family = models.PixArtAlpha if variant.startswith("alpha") else models.PixArtSigma
    handle, _ = _handle(comfy, variant)
    caplog.set_level(logging.INFO)
    model = _bridge(comfy).to_model(handle)
    assert type(model.model.model_config) is family
    assert type(model.model.latent_format) is family.latent_format
    # shared: the DiT's split tensors pointed at the original layout's fused ones: per block the self-attention's
    # q, k, v and the cross-attention's k, v (weight 144 x 144 and bias 144 each), 2 blocks, fp32
    shared = 2 * 5 * (144 * 144 + 144) * 4
    assert shared == 835_200
    lines = [r.getMessage() for r in caplog.records if "DiT -> MODEL" in r.getMessage()]
    assert lines == [f"PixArt DiT -> MODEL: tiny-{variant} ({variant}) as ComfyUI's PixArt, 2 blocks; "
                     f"{shared / 2**20:.0f} MiB shared with the DiT instead of copied"]


def test_bridged_model_shares_the_dit_weights(comfy):
    """The MODEL holds no second copy: every one of its tensors lies in the DiT's storage (fused q/k/v included),
    except the original layout's null-caption table; and the DiT still computes what it did."""
    handle, ref = _handle(comfy, "sigma-1024")
    model = _bridge(comfy).to_model(handle)
    dit = handle.patcher.model.inner
    dit_storages = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    own = [k for k, t in model.model.diffusion_model.state_dict().items()
           if t.untyped_storage().data_ptr() not in dit_storages]
    assert own == ["y_embedder.y_embedding"]
    assert not [k for k, p in model.model.named_parameters() if p.requires_grad]  # inference weights, as the DiT's
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.T5_WIDTH)
    assert torch.equal(_eps(dit, x, torch.tensor([500]), ctx), _eps(ref, x, torch.tensor([500]), ctx))


def test_a_bf16_bridged_model_computes_its_blocks_in_bf16_as_comfyuis_pixart_does(comfy):
    """A bf16 DiT bridged to a MODEL: its blocks get the image tokens, the caption and the timestep embedding in
    bf16, as ComfyUI's own PixArtMS.forward_orig (run on the same network) gives them. The position table is added in
    fp32 (diffusers' rounding) and the sum cast back; left in fp32, every block would compute in fp32."""
    import comfy.ldm.pixart.pixartms as comfy_pixart

    handle, _ = _handle(comfy, "sigma-1024")
    handle.patcher.model.inner.to(torch.bfloat16)
    bridged = _bridge(comfy).to_model(handle)
    assert bridged.model.get_dtype() == torch.bfloat16  # ComfyUI casts the sampler's input to it (apply_model)
    net = bridged.model.diffusion_model
    seen = []
    hook = net.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(a.dtype for a in args[:3])))
    torch.manual_seed(2)
    x, t = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16), torch.tensor([500.0])  # 512 px: ComfyUI's own fails below
    ctx = torch.randn(1, 5, tiny.T5_WIDTH, dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            net(x, t, ctx)
            comfy_pixart.PixArtMS.forward_orig(net, x, t, ctx.unsqueeze(1))
    finally:
        hook.remove()
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_a_bridged_model_without_its_dit_shares_nothing(comfy):
    """Once the DiT it came from is gone (its loader's output dropped and collected), a move of the MODEL shares
    nothing and frees nothing: 0 bytes (and no error, also before the bridge has recorded a DiT)."""
    import gc
    import weakref

    handle, _ = _handle(comfy, "sigma-1024")
    model = _bridge(comfy).to_model(handle).model
    gone = torch.nn.Linear(2, 2)
    model.dit = weakref.ref(gone)
    del gone
    gc.collect()
    assert model.share_with_dit() == 0
    model.dit = None
    assert model.share_with_dit() == 0
    model.to(torch.float32)  # a whole move calls it
    assert model.share_with_dit() == 0


@pytest.mark.parametrize("dit_first", [True, False], ids=["dit-loaded-first", "dit-loaded-last"])
def test_the_bridge_unloads_its_dit_and_leaves_other_models_loaded(comfy, dit_first):
    """DiT → MODEL first has ComfyUI unload the DiT (loading.unload: it takes the unpatched weights); another model
    ComfyUI holds stays loaded, whichever of the two was loaded last (ComfyUI lists the newest first)."""
    import sys

    import comfy.model_management as mm

    loading = sys.modules[_bridge(comfy).__name__.rsplit(".", 1)[0] + ".comfy.loading"]
    mm.unload_all_models()
    handle, _ = _handle(comfy, "sigma-1024")
    other = loading.wrap(tiny.make_vae(), torch.device("cpu"), torch.device("cpu"))
    for patcher in ((handle.patcher, other) if dit_first else (other, handle.patcher)):
        loading.use(patcher)
    loaded = lambda: [m.model for m in mm.current_loaded_models]  # noqa: E731
    assert handle.patcher in loaded() and other in loaded()
    _bridge(comfy).to_model(handle)
    assert handle.patcher not in loaded() and other in loaded()
    mm.unload_all_models()


def test_bridge_takes_the_unpatched_weights_of_a_loaded_patched_dit(comfy):
    """The DiT loaded by ComfyUI with a weight patch merged (as a LoRA on our loader leaves it): the MODEL is built
    from the original weights (ComfyUI unloads and restores them first), not the merged ones."""
    import comfy.model_management as mm

    handle, ref = _handle(comfy, "sigma-512")
    clone = handle.patcher.clone()
    key = "inner.transformer_blocks.0.attn1.to_q.weight"
    clone.add_patches({key: (torch.ones_like(ref.transformer_blocks[0].attn1.to_q.weight),)}, 1.0)
    mm.load_models_gpu([clone])
    inner = handle.patcher.model.inner
    assert not torch.equal(inner.transformer_blocks[0].attn1.to_q.weight, ref.transformer_blocks[0].attn1.to_q.weight)
    model = _bridge(comfy).to_model(handle)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.T5_WIDTH), torch.tensor([300])
    with torch.no_grad():
        got = model.model.diffusion_model(x, t.float(), ctx)
    assert (got - _eps(ref, x, t, ctx)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------- the CONDITIONING bridge

def _cond(embeds, mask):
    from pixart_core.conditioning import Conditioning

    return Conditioning(embeds, mask)


def test_padding_changes_nothing(comfy):
    """A conditioning padded with masked tokens (whatever they hold) samples in KSampler exactly as the unpadded one,
    and both match our sampler, which applies the mask in diffusers' attention."""
    import comfy.sample as comfy_sample

    bridge = _bridge(comfy)
    handle, ref = _handle(comfy, "sigma-1024")
    model = bridge.to_model(handle)
    torch.manual_seed(3)
    real = torch.randn(1, 6, tiny.T5_WIDTH)
    padded = _cond(torch.cat([real, 50 * torch.randn(1, 9, tiny.T5_WIDTH)], 1), torch.tensor([[1] * 6 + [0] * 9]))
    plain = _cond(real, torch.ones(1, 6, dtype=torch.long))
    neg = _cond(torch.randn(1, 2, tiny.T5_WIDTH), torch.ones(1, 2, dtype=torch.long))
    c_pad, c_plain, c_neg = (bridge.to_conditioning(c) for c in (padded, plain, neg))
    assert torch.equal(c_pad[0][0], c_plain[0][0])
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy_sample.prepare_noise(latent, 5)
    outs = [comfy_sample.sample(model, noise, 4, 4.5, "dpmpp_2m", "simple", c, c_neg, latent, seed=5)
            for c in (c_pad, c_plain)]
    assert torch.equal(outs[0], outs[1])
    # the mask really matters to diffusers: without it the padded tokens change its output
    x = torch.randn(1, 4, 8, 8)
    masked = _eps(ref, x, torch.tensor([500]), padded.embeds, padded.mask)
    assert (masked - _eps(ref, x, torch.tensor([500]), real)).abs().max() <= 1e-5
    assert (masked - _eps(ref, x, torch.tensor([500]), padded.embeds)).abs().max() > 1e-2


def test_conditioning_bridge_refuses_an_empty_mask_or_a_batch(comfy):
    with pytest.raises(ValueError) as e:
        _bridge(comfy).to_conditioning(_cond(torch.zeros(1, 3, tiny.T5_WIDTH), torch.zeros(1, 3, dtype=torch.long)))
    assert str(e.value) == ("PixArt-Σ Conditioning → CONDITIONING: the attention mask has no real token; re-encode "
                            "the prompt with PixArt-Σ Text Encode.")
    with pytest.raises(ValueError) as e:  # ComfyUI's CONDITIONING holds one prompt per entry
        _bridge(comfy).to_conditioning(_cond(torch.zeros(2, 3, tiny.T5_WIDTH), torch.ones(2, 3, dtype=torch.long)))
    assert str(e.value) == "PixArt-Σ Conditioning → CONDITIONING: expected one prompt, got 2."


def test_conditioning_bridge_adds_nothing_for_a_prompt_without_other_limits(comfy):
    """ComfyUI's CONDITIONING entry is [tensor, options]: a prompt encoded at one token limit gives empty options."""
    embeds = torch.randn(1, 3, tiny.T5_WIDTH)
    out = _bridge(comfy).to_conditioning(_cond(embeds, torch.tensor([[1, 1, 0]])))
    assert len(out) == 1 and out[0][1] == {} and torch.equal(out[0][0], embeds[:, :2])


def test_alpha_model_reads_the_conditioning_at_its_token_limit(comfy):
    """A prompt encoded at 300 tokens with its 120-token encoding attached: the α MODEL reads the 120 one, as our
    sampler does (pixart_core.conditioning.for_limit), a Σ MODEL the 300 one."""
    bridge = _bridge(comfy)
    long, short = torch.randn(1, 150, tiny.T5_WIDTH), torch.randn(1, 120, tiny.T5_WIDTH)
    c = _cond(long, torch.ones(1, 150, dtype=torch.long))
    c.at_limit[120] = _cond(short, torch.ones(1, 120, dtype=torch.long))
    [[embeds, extra]] = bridge.to_conditioning(c)
    for variant, want in (("alpha-512", short), ("sigma-512", long)):
        model = bridge.to_model(_handle(comfy, variant)[0])
        conds = model.model.extra_conds(cross_attn=embeds, **extra)
        assert torch.equal(conds["c_crossattn"].cond, want), variant


# ---------------------------------------------------------------------------------------------- ComfyUI's samplers

def _dpmpp_sigmas(model, steps: int) -> torch.Tensor:
    """The sigmas of the release's DPM-Solver++ schedule (diffusers' DPMSolverMultistepScheduler configured as
    PixArt-Σ's scheduler_config.json) at ComfyUI's discrete sigmas for those timesteps, then 0."""
    from diffusers import DPMSolverMultistepScheduler

    s = DPMSolverMultistepScheduler(**{k: v for k, v in SIGMA_SCHEDULER_CONFIG.items() if k[0] != "_"})
    s.set_timesteps(steps)
    return torch.cat([model.model.model_sampling.sigma(s.timesteps.float()), torch.zeros(1)])


def test_sample_custom_dpmpp_2m_on_the_release_timesteps_equals_our_sampler(comfy):
    """ComfyUI's dpmpp_2m on the release's timesteps (SamplerCustomAdvanced's path: comfy.samplers.sample with a
    SIGMAS tensor) is the same solver as diffusers' DPMSolverMultistep (2nd order, midpoint, lower order at the
    end): equal to our sampler on the same noise to 1e-5 of the latents' range (fp32 rounding over 10 steps; the
    random tiny DiT's latents reach a few hundred)."""
    import comfy.sample as comfy_sample
    import comfy.samplers as comfy_samplers

    from pixart_core import sampling

    bridge = _bridge(comfy)
    handle, ref = _handle(comfy, "sigma-1024")
    model = bridge.to_model(handle)
    torch.manual_seed(4)
    pos = _cond(torch.randn(1, 6, tiny.T5_WIDTH), torch.ones(1, 6, dtype=torch.long))
    neg = _cond(torch.randn(1, 1, tiny.T5_WIDTH), torch.ones(1, 1, dtype=torch.long))
    latent = torch.zeros(2, 4, 8, 12)
    noise = comfy_sample.prepare_noise(latent, 11)
    ours, _ = sampling.initial_noise(11, 2, 4, 64, 96)
    assert torch.equal(noise, ours)  # KSampler's noise convention is ours
    got = comfy_sample.sample_custom(model, noise, 4.5, comfy_samplers.sampler_object("dpmpp_2m"),
                                     _dpmpp_sigmas(model, 10), bridge.to_conditioning(pos),
                                     bridge.to_conditioning(neg), latent, seed=11)
    want = sampling.sample(ref, pos, neg, ours, steps=10, cfg=4.5, scheduler="dpmpp_2m")
    # ComfyUI's latent is the model-space one divided back by nothing (process_out is the SDXL scale: undo it)
    got_scaled = model.model.latent_format.process_in(got)
    err = ((got_scaled - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err


KSAMPLER_TOL = 1e-3  # relative L2 distance (measured 3.8e-5 here): see the test below


def test_ksampler_simple_schedule_is_close_to_our_sampler(executor, comfy_base):
    """KSampler dpmpp_2m / simple, fed by our loaders through the bridges (the real executor), against our sampler's
    dpm++ 2m on the same seed; SamplerCustomAdvanced (RandomNoise, CFGGuider, KSamplerSelect, BasicScheduler) gives
    KSampler's latents. 'simple' takes timesteps 999 - k·(1000/steps) (ComfyUI's discrete sigmas), diffusers'
    linspace rounds 999 - k·999/steps: they differ by one timestep on some steps (10 steps: 499/399/299/199/99 vs
    500/400/300/200/100), so the results are close, not equal (the test above shows the solver itself agrees)."""
    prompt = {
        "1": {"class_type": "PixArtSigmaT5Loader", "inputs": {"t5_name": "tiny_t5xxl_fp16.safetensors",
                                                              "quantization": "none", "dtype": "auto"}},
        "2": {"class_type": "PixArtSigmaTextEncode", "inputs": {"t5": ["1", 0], "positive": PROMPT, "negative": "",
                                                                "max_tokens": 0}},
        "3": {"class_type": "PixArtSigmaDiTLoader", "inputs": {"dit_name": DIT_FILE, "variant": "auto", "dtype": "fp32"}},
        "4": {"class_type": "PixArtSigmaSampler",
              "inputs": {"dit": ["3", 0], "positive": ["2", 0], "negative": ["2", 1], "seed": 9, "steps": 10,
                         "cfg": 4.5, "scheduler": "dpm++ 2m", "width": 64, "height": 64, "batch_size": 1,
                         "denoise": 1.0}},
        "5": {"class_type": "PixArtSigmaDiTToModel", "inputs": {"dit": ["3", 0]}},
        "6": {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 0]}},
        "7": {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 1]}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler",
              "inputs": {"model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["8", 0],
                         "seed": 9, "steps": 10, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "simple",
                         "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "bridge_ours"}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "bridge_ksampler"}},
        # the same through SamplerCustomAdvanced's pieces
        "12": {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}},
        "13": {"class_type": "CFGGuider", "inputs": {"model": ["5", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                    "cfg": 4.5}},
        "14": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "15": {"class_type": "BasicScheduler", "inputs": {"model": ["5", 0], "scheduler": "simple", "steps": 10,
                                                         "denoise": 1.0}},
        "16": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["12", 0], "guider": ["13", 0],
                                                                "sampler": ["14", 0], "sigmas": ["15", 0],
                                                                "latent_image": ["8", 0]}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "bridge_custom"}},
    }
    result = executor.run(prompt)
    assert result["ok"], result["error"]
    lat = {}
    for nid in ("10", "11", "17"):
        info = result["outputs"][nid]["latents"][0]
        lat[nid] = load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]
    ours, theirs = lat["10"], lat["11"]
    assert ours.shape == theirs.shape == (1, 4, 8, 8) and torch.isfinite(theirs).all()
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel <= KSAMPLER_TOL, rel
    assert torch.equal(lat["17"], theirs)  # SamplerCustomAdvanced takes the MODEL and CONDITIONING as KSampler does


# --------------------------------------------------------------------------------------------------------- LoRA


def test_lora_loader_model_only_equals_hand_merge(comfy, comfy_base):
    """ComfyUI's LoraLoaderModelOnly on the bridged MODEL applies every key (diffusers `transformer.` keys and an
    original `lora_unet_` fused qkv key) as W + strength·(alpha/rank)·B·A, to 1e-5; the base MODEL is untouched."""
    import comfy.model_management as mm

    handle, ref = _handle(comfy, "sigma-1024", seed=2)
    model = _bridge(comfy).to_model(handle)
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    delta = _lora_file(loras / "tiny_bridge_lora.safetensors", ref)
    strength = 0.7
    patched = _node(comfy, "LoraLoaderModelOnly")().load_lora_model_only(model, "tiny_bridge_lora.safetensors",
                                                                         strength)[0]
    assert len(patched.patches) == len(delta) - 2  # q/k/v rows of the fused key land on one tensor, with offsets
    merged = copy.deepcopy(ref)
    with torch.no_grad():
        for name, d in delta.items():
            merged.get_parameter(name).add_(strength * d)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.T5_WIDTH), torch.tensor([600])
    mm.load_models_gpu([patched])
    with torch.no_grad():
        got = patched.model.diffusion_model(x, t.float(), ctx)
    assert (got - _eps(merged, x, t, ctx)).abs().max() <= 1e-5
    assert (got - _eps(ref, x, t, ctx)).abs().max() > 1e-3  # the LoRA does change the output
    mm.unload_all_models()
    with torch.no_grad():
        base = model.model.diffusion_model(x, t.float(), ctx)
    assert (base - _eps(ref, x, t, ctx)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------- ComfyUI's native PixArt + our T5

def test_native_unet_loader_model_runs_with_our_conditioning(comfy, comfy_base):
    """ComfyUI's own PixArt (UNETLoader on an original-layout file; its detection fixes width 1152, 16 heads and
    4096-wide captions, so this is a 1-block XL) sampled by KSampler with our conditioning bridge: at 512 px, where
    ComfyUI's guessed pe_interpolation (1, from the file's 32x32 position table) is right for a Σ-512 file, it gives
    what the bridged MODEL of the same weights gives."""
    from pixart_core.conditioning import Conditioning
    from pixart_core import transformer as core_dit

    handle, ref = _handle(comfy, "sigma-512", size="bench", layers=1)
    sd = ref.state_dict()
    pos = core_dit.position_embedding(1152, 32, 32, 32, 1.0)  # the released file's table: 512 px, pe 1
    path = comfy_base / "models" / "diffusion_models" / "bench1-native-PixArt-Sigma-XL-2-512-MS.safetensors"
    save_file(tiny.dit_to_original(sd, pos_embed=pos, y_embedding=torch.zeros(300, 4096)), str(path))
    native = _node(comfy, "UNETLoader")().load_unet(path.name, "default")[0]
    bridged = _node(comfy, "PixArtSigmaDiTToModel").execute(handle).result[0]
    torch.manual_seed(2)
    to_comfy = _node(comfy, "PixArtSigmaConditioningToComfy")
    pos_c, neg_c = (to_comfy.execute(Conditioning(torch.randn(1, n, 4096), torch.ones(1, n, dtype=torch.long))).result[0]
                    for n in (9, 1))
    latent = {"samples": torch.zeros(1, 4, 64, 64)}
    ksampler = _node(comfy, "KSampler")()
    out = [ksampler.sample(m, 1, 2, 4.5, "dpmpp_2m", "simple", pos_c, neg_c, latent)[0]["samples"]
           for m in (native, bridged)]
    assert torch.isfinite(out[0]).all() and out[0].shape == (1, 4, 64, 64)
    assert (out[0] - out[1]).abs().max() <= 1e-4 * out[1].abs().max()


def test_our_lora_loader_and_comfyuis_agree_on_the_bridged_model(comfy, comfy_base, caplog):
    """The same LoRA file two ways: PixArt-Σ LoRA Loader on our DiT and then DiT → MODEL (its patches carried onto
    the MODEL's fused keys), and DiT → MODEL and then ComfyUI's LoraLoaderModelOnly. Both MODELs, and our own DiT
    with our loader's patches, give the hand-merged model's epsilon (W + strength·(alpha/rank)·B·A) to 1e-5."""
    import comfy.model_management as mm

    sys_modules = __import__("sys").modules
    management = sys_modules[_bridge(comfy).__name__.rsplit(".", 1)[0] + ".comfy.loading"]
    handle, ref = _handle(comfy, "sigma-1024", seed=3)
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    delta = _lora_file(loras / "tiny_bridge_lora_2.safetensors", ref, seed=5)
    strength = 2.0
    merged = copy.deepcopy(ref)
    with torch.no_grad():
        for name, d in delta.items():
            merged.get_parameter(name).add_(strength * d)
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, tiny.T5_WIDTH), torch.tensor([600])
    want = _eps(merged, x, t, ctx)
    assert (want - _eps(ref, x, t, ctx)).abs().max() > 1e-3  # the LoRA does change the output (100x the tolerance)

    ours = _node(comfy, "PixArtSigmaLoraLoader").execute(dit=handle, lora_name="tiny_bridge_lora_2.safetensors",
                                                         strength=strength).result[0]
    ready = management.use(ours.patcher)
    assert (_eps(ready.model, x, t, ctx) - want).abs().max() <= 1e-5
    caplog.set_level("INFO")
    ours_model = _bridge(comfy).to_model(ours)
    carried = [r.getMessage() for r in caplog.records if "carried over" in r.getMessage()]
    assert carried == [f"PixArt DiT -> MODEL: {len(delta)} LoRA-patched weights carried over"]  # one per weight
    theirs_model = _node(comfy, "LoraLoaderModelOnly")().load_lora_model_only(
        _bridge(comfy).to_model(handle), "tiny_bridge_lora_2.safetensors", strength)[0]
    for model in (ours_model, theirs_model):
        mm.load_models_gpu([model])
        with torch.no_grad():
            got = model.model.diffusion_model(x, t.float(), ctx)
        assert (got - want).abs().max() <= 1e-5
        mm.unload_all_models()
    with torch.no_grad():  # unloaded: the shared weights are the base model's again
        base = ours_model.model.diffusion_model(x, t.float(), ctx)
    assert (base - _eps(ref, x, t, ctx)).abs().max() <= 1e-5


def test_a_bias_patch_on_fused_rows_is_carried_to_the_model(comfy, comfy_base):
    """A LoRA holding only a bias difference on the original layout's fused self-attention qkv (`diff_b`, as ComfyUI
    reads it: b + strength·diff_b) through PixArt-Σ LoRA Loader, then DiT → MODEL: the loaded MODEL's qkv bias is
    the base bias plus strength times the file's difference, rows for q, k and v alike."""
    import comfy.model_management as mm
    from safetensors.torch import save_file as save

    handle, ref = _handle(comfy, "sigma-1024", seed=4)
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    diff = torch.randn(3 * 144, generator=torch.Generator().manual_seed(8))
    save({"diffusion_model.blocks.0.attn.qkv.diff_b": diff}, str(loras / "tiny_qkv_bias.safetensors"))
    ours = _node(comfy, "PixArtSigmaLoraLoader").execute(dit=handle, lora_name="tiny_qkv_bias.safetensors",
                                                         strength=0.5).result[0]
    model = _bridge(comfy).to_model(ours)
    attn = ref.transformer_blocks[0].attn1
    base = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]).detach()
    mm.load_models_gpu([model])
    try:
        got = model.model.diffusion_model.blocks[0].attn.qkv.bias.detach().clone()
    finally:
        mm.unload_all_models()
    torch.testing.assert_close(got, base + 0.5 * diff, atol=1e-6, rtol=1e-6)


def test_original_target_names_the_rows_to_original_writes(comfy):
    """Every parameter of a diffusers PixArt is found in to_original's output at the key and rows original_target
    names (the fused q/k/v and k/v rows included), with the same values."""
    from pixart_core import transformer as core_dit

    dit = tiny.make_dit("tiny", variant="alpha-1024", seed=1)
    sd = dit.state_dict()
    original = core_dit.to_original(sd, 120)
    for key, value in sd.items():
        if key.startswith("pos_embed.") and not key.startswith("pos_embed.proj."):
            continue
        name, rows = core_dit.original_target(key, value.shape[0])
        got = original[name] if rows is None else original[name].narrow(*rows)
        assert torch.equal(got, value), key
    with pytest.raises(KeyError, match="not a parameter"):
        core_dit.original_target("transformer_blocks.0.attn1.nonsense.weight", 4)


def test_a_weight_patch_on_rows_or_through_a_function_is_refused_by_the_bridge(comfy):
    """PixArt-Σ LoRA Loader patches whole parameters; a patch ComfyUI's ModelPatcher.add_patches holds on rows of a
    weight (a (key, offset) key) or through a function (a (key, offset, function) key) is refused by name, not
    carried to the wrong rows."""
    handle, _ = _handle(comfy, "sigma-1024", seed=3)
    key = "inner.transformer_blocks.0.attn1.to_q.weight"
    rows = handle.patcher.model.inner.get_parameter(key[len("inner."):]).shape[0]
    for patch_key in ((key, (0, 0, rows // 2)), (key, None, lambda w: w)):
        patched = handle.patcher.clone()
        assert patched.add_patches({patch_key: ("diff", (torch.zeros(rows // 2, 1),))}, 0.5) == [patch_key]
        with pytest.raises(ValueError) as e:
            _bridge(comfy).to_model(dataclasses.replace(handle, patcher=patched))
        assert str(e.value) == (f"{key}: a weight patch on part of a weight or through a function cannot be carried "
                                "over to a ComfyUI MODEL")


@pytest.mark.parametrize("variant", ["sigma-1024", "alpha-512"])
def test_a_bridged_network_on_the_gpu_computes_there(comfy, variant):
    """The bridged network moved to a GPU (simulated: harness/fake_cuda.py refuses an operation that mixes GPU and
    CPU tensors, as CUDA does) makes its position table and every other tensor there: the same noise prediction as
    on the CPU, on the GPU. Both families: Σ and α-512 (micro-conditions off) read the table at their own grid."""
    from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

    handle, _ = _handle(comfy, variant)
    net = _bridge(comfy).to_model(handle).model.diffusion_model
    torch.manual_seed(4)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, tiny.T5_WIDTH)
    with torch.no_grad():
        want = net(x, t, ctx)
        with comfy_sees(FakeCuda(1 << 30)) as fake:  # ComfyUI's attention asks it for free memory
            gpu_net = copy.deepcopy(net).to(CUDA)
            got = gpu_net(x.cuda(), t.cuda(), ctx.cuda())
            assert fake.holds(got)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["sigma-512", "sigma-1024", "sigma-2k", "alpha-512", "alpha-1024"])
def test_the_bridged_models_config_is_what_comfyui_detects_from_the_released_checkpoint(comfy, variant):
    """What the bridged MODEL tells ComfyUI and other nodes about itself (model_config.unet_config) is what ComfyUI's
    own loader detects from the released checkpoint of that variant (comfy.model_detection.detect_unet_config on
    its keys and shapes: the original keys with `pos_embed` of the trained grid, as the release files have it),
    with the defaults of ComfyUI's PixArtMS for what detection leaves out (learn_sigma). ComfyUI guesses
    pe_interpolation as input_size // 64, right for these variants (not for the 256 ones); it names a checkpoint
    pixart_alpha only when it has the micro-conditioning embedders, which α-512 lacks (the bridge names α-512
    pixart_alpha: its latents are SD's, comfy.supported_models.PixArtAlpha's). Full-size DiTs, on the meta device."""
    import inspect

    import comfy.ldm.pixart.pixartms as comfy_pixart
    from comfy.model_detection import detect_unet_config
    from diffusers import PixArtTransformer2DModel

    from pixart_core import transformer as core_dit
    from pixart_core.variants import PRESETS

    native = sys.modules[_bridge(comfy).__name__.rsplit(".", 1)[0] + ".comfy.native_pixart"]
    preset = PRESETS[variant]
    with torch.device("meta"):
        dit = PixArtTransformer2DModel(**tiny.dit_config("full", variant))
    checkpoint = core_dit.to_original(dit.state_dict(), preset.max_tokens)
    grid = dit.config.sample_size // dit.config.patch_size
    checkpoint["pos_embed"] = torch.empty(1, grid * grid, 1152, device="meta")
    detected = detect_unet_config(checkpoint, "")
    defaults = {k: p.default for k, p in inspect.signature(comfy_pixart.PixArtMS.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    comfys = {**defaults, **detected}
    if variant == "alpha-512":
        assert comfys["image_model"] == "pixart_sigma" and not comfys["micro_condition"]
        comfys["image_model"] = "pixart_alpha"
    ours = native.unet_config(dit, preset)
    shared = sorted(set(ours) & set(comfys))
    assert {"image_model", "input_size", "pe_interpolation", "learn_sigma", "pred_sigma", "micro_condition", "depth",
            "model_max_length", "hidden_size", "num_heads", "patch_size", "in_channels"} <= set(shared)
    assert {k: ours[k] for k in shared} == {k: comfys[k] for k in shared}

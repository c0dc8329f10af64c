"""PixArt-Σ Sampler and Sampler (Advanced) in detail, the nodes run directly in this process (nodes/sampler.py's
_run and _output, which both share): an img2img latent of the other latent space refused with the sampler's message
before anything loads; the mask input without a latent refused, and its log line when it replaces a noise_mask; the
log line naming the DiT whose token limit picks the shorter encoding; a stochastic scheduler drawing from the seed's
generator (against our sampling, itself checked against diffusers in tests/core); the input latent's other keys
kept; the memory asked of ComfyUI, written out by hand from pixart_core/dit_memory.py's formula for one, two and three
passes (cfg and PAG) in the DiT's dtype, and with SDPA's math kernel on a (fake) GPU without bf16 kernels, where the
DiT computes, the previewer is made and from where the latent comes back to ComfyUI's intermediate device."""
from __future__ import annotations

import copy
import logging

import pytest
import reference_settings as reference
import torch

from cases import OTHER_LATENT_SPACE
from harness import models as tiny
from harness.comfyui import dit_handle, pack
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees
from harness.recording import record_loads, record_previewers
from pixart_core import sampling

CPU = torch.device("cpu")
RESERVE = 64 << 20  # dit_memory.RESERVE, as written there
INNER = 144  # the tiny DiT's width, num_attention_heads x attention_head_dim (checked in the memory tests)
DIT = ["PixArtTransformer2DModel"]
SAMPLER = {"seed": 5, "steps": 2, "cfg": 4.5, "scheduler": "dpm++ 2m", "width": 64, "height": 64, "batch_size": 1}
ADVANCED = {"add_noise": "enable", "seed": 5, "steps": 2, "cfg": 4.5, "scheduler": "dpm++ 2m", "start_step": 0,
            "end_step": 10000, "return_with_leftover_noise": "disable", "pag_scale": 0.0, "pag_layers": "1",
            "guidance_rescale": 0.0, "cfg_start": 0.0, "cfg_end": 1.0, "dmd_timestep": 400}


def _sampler(comfy, handle, conds, **settings) -> dict:
    """PixArt-Σ Sampler's output LATENT."""
    pos, neg = conds
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSampler"]
    return node.execute(dit=handle, positive=pos, negative=neg, **{**SAMPLER, **settings}).result[0]


def _advanced(comfy, handle, conds, latent, **settings) -> dict:
    pos, neg = conds
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaSamplerAdvanced"]
    return node.execute(dit=handle, positive=pos, negative=neg, latent=latent, **{**ADVANCED, **settings}).result[0]


def _latent(h: int = 8, w: int = 8, seed: int = 8, **extra) -> dict:
    return {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed)), **extra}


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("PixArt")]


# ----------------------------------------------------------------------------------------- refusals and logs

@pytest.mark.parametrize("variant,space,message", OTHER_LATENT_SPACE)
def test_a_latent_of_the_other_latent_space_is_refused_before_loading(comfy, conds, monkeypatch, variant, space,
                                                                       message):
    import comfy.model_management as mm

    loads = record_loads(mm, monkeypatch)
    handle = dit_handle(tiny.make_dit(variant=variant), variant)
    with pytest.raises(ValueError) as e:
        _sampler(comfy, handle, conds, latent=_latent(pixart_latent_space=space), denoise=0.5)
    assert str(e.value) == message
    assert loads == []


def test_a_mask_without_a_latent_is_refused_with_what_to_connect(comfy, conds):
    handle = dit_handle(tiny.make_dit(), "sigma-1024")
    with pytest.raises(ValueError) as e:
        _sampler(comfy, handle, conds, mask=torch.ones(1, 64, 64))
    assert str(e.value) == ("PixArt sampler: the inpainting mask needs the image's latent; connect 'latent' (VAE "
                            "Encode of the image, or Set Latent Noise Mask's output).")


def test_the_mask_input_says_when_it_replaces_the_latents_noise_mask(comfy, conds, caplog):
    handle = dit_handle(tiny.make_dit(), "sigma-1024")
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    caplog.set_level(logging.INFO)
    _sampler(comfy, handle, conds, latent=_latent(), mask=mask)
    assert "PixArt sampler: the mask input replaces the latent's noise_mask." not in _messages(caplog)
    _sampler(comfy, handle, conds, latent=_latent(noise_mask=torch.ones(1, 64, 64)), mask=mask)
    assert _messages(caplog).count("PixArt sampler: the mask input replaces the latent's noise_mask.") == 1


def test_the_log_names_the_dit_whose_token_limit_picks_the_shorter_encoding(comfy, conds, caplog):
    """A positive prompt encoded at 300 tokens with its 120-token encoding beside it (Text Encode's max_tokens 0):
    PixArt-α's DiT (trained with 120) reads the shorter one, and says so naming its variant."""
    from pixart_core.conditioning import Conditioning

    pos, neg = conds
    g = torch.Generator().manual_seed(6)
    long = Conditioning(torch.randn(1, 130, tiny.T5_WIDTH, generator=g), torch.ones(1, 130, dtype=torch.long))
    long.at_limit[120] = Conditioning(torch.randn(1, 120, tiny.T5_WIDTH, generator=g),
                                      torch.ones(1, 120, dtype=torch.long))
    caplog.set_level(logging.INFO)
    _sampler(comfy, dit_handle(tiny.make_dit(variant="alpha-512"), "alpha-512"), (long, neg))
    assert "PixArt sampler: alpha-512 reads 120 T5 tokens; using the prompt encoded at that limit." in _messages(caplog)


# ------------------------------------------------------------------------------------ generator and the LATENT

def test_a_stochastic_scheduler_draws_from_the_seeds_generator(comfy, conds):
    """euler ancestral, img2img at denoise 0.5: bit for bit our sampling of the VAE-scaled latent with the generator
    seeded for the noise, which the ancestral steps go on drawing from (ComfyUI's convention: one CPU generator per
    seed)."""
    pos, neg = conds
    dit = tiny.make_dit(seed=3)
    latent = _latent(8, 12)
    got = _sampler(comfy, dit_handle(copy.deepcopy(dit), "sigma-1024"), conds, latent=latent, steps=6, denoise=0.5,
                   scheduler="euler ancestral")["samples"]
    scale = reference.VAE_SCALING["sdxl"]
    noise, gen = sampling.initial_noise(5, 1, 4, 64, 96)
    want = sampling.sample(dit, pos, neg, noise, generator=gen, steps=6, cfg=4.5, scheduler="euler_ancestral",
                           init_latents=latent["samples"] * scale, denoise=0.5) / scale
    assert torch.equal(got, want)


def test_the_sampler_keeps_the_input_latents_other_keys(comfy, conds):
    """As ComfyUI's KSampler: the LATENT out carries the input's batch_index (and every other key) beside the new
    samples, and says which latent space they are in."""
    handle = dit_handle(tiny.make_dit(), "sigma-1024")
    out = _sampler(comfy, handle, conds, latent=_latent(batch_index=[3]), denoise=0.5)
    assert out["batch_index"] == [3] and out["pixart_latent_space"] == "sdxl" and out["samples"].shape == (1, 4, 8, 8)


# ---------------------------------------------------------------------------------------------------- memory

def _fused(n: int, tokens: int, size: int) -> int:
    """dit_memory.inference_memory written out with a fused SDPA kernel: the feed-forward's 12 rows of `size`-byte
    values per token and pass (the attention phase's 6 rows plus 4 bytes per value and head is smaller)."""
    rows = n * tokens * INNER
    assert rows * 12 * size > rows * (6 * size + 4) + n * 16 * tokens * 4
    return rows * 12 * size + RESERVE


@pytest.mark.parametrize("cfg,pag,passes", [(1.0, 0.0, 1), (1.5, 0.0, 2), (1.0, 0.5, 2), (4.5, 3.0, 3)])
def test_the_memory_asked_counts_each_pass_in_the_dits_dtype(comfy, conds, monkeypatch, cfg, pag, passes):
    """A bf16 DiT on the CPU (fused SDPA), 64x64 (16 tokens): ComfyUI is asked for one forward whose batch has a pass
    for the prompt, one more when cfg > 1 and one more with PAG (Sampler (Advanced) from an Empty Latent Image)."""
    import comfy.model_management as mm

    dit = tiny.make_dit().to(torch.bfloat16)
    assert dit.config.num_attention_heads * dit.config.attention_head_dim == INNER
    loads = record_loads(mm, monkeypatch)
    _advanced(comfy, dit_handle(dit, "sigma-1024"), conds, {"samples": torch.zeros(1, 4, 8, 8)}, cfg=cfg,
              pag_scale=pag, steps=1)
    assert _fused(passes, 16, 2) == passes * 16 * 144 * 12 * 2 + RESERVE
    assert [m for names, m in loads if names == DIT] == [_fused(passes, 16, 2)]


def test_on_a_gpu_without_bf16_kernels_the_dit_computes_there_and_the_latent_comes_back(comfy, conds, monkeypatch):
    """A bf16 DiT on a (fake) Turing GPU, sm75: SDPA has no memory-efficient bf16 kernel there, so its math kernel's
    memory is asked (dit_memory: residual, norm, q, k, v and output in bf16, their fp32 copies and the scaled q, k
    and fp32 output: 36 bytes per row; scores and softmax 2 x 16 heads x tokens^2 x 4 bytes per pass). The DiT
    computes on the GPU (harness/fake_cuda.py refuses CPU tensors there, as CUDA does), ComfyUI's previewer is made
    for it, and the LATENT comes back on ComfyUI's intermediate device, the CPU."""
    import comfy.model_management as mm

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    previewers = record_previewers(monkeypatch)
    loading, types_, variants = pack("nodes.comfy.loading"), pack("nodes.types"), pack("pixart_core.variants")
    dit = tiny.make_dit().to(torch.bfloat16)
    handle = types_.DiTHandle(loading.wrap(dit, CUDA, CPU), variants.PRESETS["sigma-1024"], "tiny-sigma-1024", "t")
    inputs = []
    dit.register_forward_pre_hook(lambda module, args: inputs.append(args[0].device))
    loads = record_loads(mm, monkeypatch)
    n, tokens = 2, 16  # cfg 4.5: two passes; 64x64
    rows = n * tokens * INNER
    math = rows * (6 * 2 + 3 * 4 + 3 * 4) + 2 * n * 16 * tokens * tokens * 4
    assert math == 231_424 and math > rows * 12 * 2
    with comfy_sees(FakeCuda(1 << 34)):
        out = _sampler(comfy, handle, conds, steps=2)
        assert out["samples"].device == CPU
    assert [m for names, m in loads if names == DIT] == [math + RESERVE]
    assert previewers == [CUDA]
    assert set(inputs) == {CUDA} and len(inputs) == 2


def test_with_a_controlnet_the_sampler_asks_for_its_streams_per_pass_and_hints_at_the_latent_size(comfy, conds,
                                                                                                 tmp_path, monkeypatch):
    """An fp32 DiT with one ControlNet on the CPU, 64x48 (12 tokens), batch 2, cfg 4.5: DiT and ControlNet load in one
    call asking for the sampler's forward (fused SDPA: 12 rows of 4 bytes per pass and image) plus the ControlNet's
    control stream and block output beside the DiT's stream: 2 tensors x (2 images x 2 passes) x 12 x 144 x 4 bytes.
    The hint is encoded once for the batch, at the latent's size (6 x 8, whole numbers)."""
    import dataclasses

    import comfy.model_management as mm

    from harness import controlnet_files as cfiles

    loading, types_, cn_files = pack("nodes.comfy.loading"), pack("nodes.types"), pack("pixart_core.controlnet_files")
    dit = tiny.make_dit()
    path = cfiles.write_adapter_file(tmp_path / "tiny-controlnet.safetensors", cfiles.adapter_state_dict(dit, 1))
    adapter = cn_files.load_controlnet(path)[0]
    handle = dit_handle(dit, "sigma-1024")
    controlnet = types_.ControlNetHandle(loading.wrap(adapter, CPU, CPU), "tiny-controlnet.safetensors", None, "")
    vae = types_.VAEHandle(loading.wrap(tiny.make_vae(), CPU, CPU), "tiny_sdxl_vae.safetensors", "sdxl")
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    applied = types_.AppliedControl(controlnet, image, vae, 1.0, 0.0, 1.0)
    controlled = dataclasses.replace(handle, controls=(applied,))
    loads = record_loads(mm, monkeypatch)
    _sampler(comfy, controlled, conds, width=64, height=48, batch_size=2, steps=1)
    n, tokens = 2 * 2, 12
    forward = _fused(n, tokens, 4)
    extra = 2 * n * tokens * INNER * 4
    assert loads[-1] == (["ControlNetAdapter", "PixArtTransformer2DModel"], forward + extra)
    assert list(applied.hints) == [(6, 8)] and all(type(s) is int for s in next(iter(applied.hints)))
    assert applied.hints[(6, 8)].shape == (1, 4, 6, 8)

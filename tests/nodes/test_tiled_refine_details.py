"""PixArt-Σ Tiled Refine (nodes/hires.py TiledRefine) in detail, the node run directly in this process: an img2img
latent of the other latent space is refused with the sampler's message; its log lines (the canvas, tiles and tile
size; a prompt longer than the DiT's T5 limit) whole, on a canvas that is no multiple of 16; the scheduler chosen and
its generator (a stochastic scheduler in one tile equals our sampling with the seed's generator); the memory it asks
ComfyUI for, written out by hand from pixart_core/dit_memory.py's formula around the CFG boundary, in the DiT's
dtype, with SDPA's math kernel on a (fake) GPU without bf16 kernels, where the DiT computes, ComfyUI's previewer is
made for that GPU and the result comes back to the CPU; with a ControlNet applied, its extra memory per CFG pass and
the hint at the canvas's latent size."""
from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import reference_settings as reference
import torch

from cases import OTHER_LATENT_SPACE
from harness import controlnet_files as cfiles
from harness import models as tiny
from harness.comfyui import dit_handle, pack
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees
from harness.recording import record_loads, record_previewers
from pixart_core import sampling

CPU = torch.device("cpu")
RESERVE = 64 << 20  # dit_memory.RESERVE, as written there
INNER = 144  # the tiny DiT's width, num_attention_heads x attention_head_dim (checked by _inner)
DIT = ["PixArtTransformer2DModel"]
DIT_AND_CONTROLNET = ["ControlNetAdapter", "PixArtTransformer2DModel"]


def _execute(comfy, handle, conds, latent, **settings):
    """PixArt-Σ Tiled Refine's output LATENT (the node run directly)."""
    pos, neg = conds
    inputs = {"seed": 5, "steps": 2, "cfg": 4.5, "scheduler": "dpm++ 2m", "denoise": 0.5, "tile_width": 64,
              "tile_height": 64, "overlap": 0, **settings}
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTiledRefine"]
    return node.execute(dit=handle, positive=pos, negative=neg, latent=latent, **inputs).result[0]


def _latent(h: int, w: int, seed: int = 8, **extra) -> dict:
    return {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed)), **extra}


def _inner(dit) -> int:
    inner = dit.config.num_attention_heads * dit.config.attention_head_dim
    assert inner == INNER
    return inner


# ------------------------------------------------------------------------------------------- refusal and logs

@pytest.mark.parametrize("variant,space,message", OTHER_LATENT_SPACE)
def test_a_latent_of_the_other_latent_space_is_refused_before_loading(comfy, conds, monkeypatch, variant, space,
                                                                       message):
    """SD-space latents for a PixArt-Σ DiT (SDXL latent space), and the reverse for PixArt-α: same shapes, wrong
    colours, so refused with the sampler's message naming the DiT and its variant, before ComfyUI loads anything."""
    import comfy.model_management as mm

    loads = record_loads(mm, monkeypatch)
    handle = dit_handle(tiny.make_dit(variant=variant), variant)
    with pytest.raises(ValueError) as e:
        _execute(comfy, handle, conds, _latent(8, 16, pixart_latent_space=space))
    assert str(e.value) == message
    assert loads == []


def test_log_lines_on_a_canvas_that_is_no_multiple_of_16(comfy, conds, caplog):
    """A 136x64 canvas (latent 8x17: tiles are multiples of 16, the canvas need not be) in 80x64 tiles overlapping
    by at least 32 px: latent columns 0-9, 4-13 and 7-16 (starts (17 - 10) x i / 2 rounded: 0, 4, 7), so 3 tiles.
    The node logs that whole; and a PixArt-α DiT (trained with 120 T5 tokens) given a 130-token negative prompt warns
    naming the variant. The refined latent has the canvas's size and the DiT's latent space."""
    from pixart_core.conditioning import Conditioning

    pos, _ = conds
    long_negative = Conditioning(torch.randn(1, 130, tiny.T5_WIDTH, generator=torch.Generator().manual_seed(4)),
                                 torch.ones(1, 130, dtype=torch.long))
    handle = dit_handle(tiny.make_dit(variant="alpha-512"), "alpha-512")
    caplog.set_level(logging.INFO)
    out = _execute(comfy, handle, (pos, long_negative), _latent(8, 17), tile_width=80, tile_height=64, overlap=32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PixArt")]
    assert "PixArt sampler: alpha-512 was trained with 120 T5 tokens but gets 130; set max_tokens to 120 (or 0, from " \
           "the DiT) in Text Encode." in lines
    assert "PixArt tiled refine: 136x64 in 3 tiles of 80x64" in lines
    assert out["samples"].shape == (1, 4, 8, 17) and out["pixart_latent_space"] == "sd"
    assert torch.isfinite(out["samples"]).all()


# -------------------------------------------------------------------------------------- scheduler and generator

def test_a_stochastic_scheduler_draws_from_the_seeds_generator(comfy, conds):
    """euler ancestral (not the default dpm++ 2m) in one tile covering a 96x64 canvas: bit for bit our sampling of
    the VAE-scaled latent with that scheduler and the generator seeded for the noise, which the ancestral steps go
    on drawing from (ComfyUI's convention: one CPU generator per seed)."""
    pos, neg = conds
    dit = tiny.make_dit(seed=3)
    handle = dit_handle(copy.deepcopy(dit), "sigma-1024")
    latent = _latent(8, 12)
    got = _execute(comfy, handle, conds, latent, steps=6, denoise=0.5, scheduler="euler ancestral", tile_width=96,
                   tile_height=64)["samples"]
    scale = reference.VAE_SCALING["sdxl"]
    noise, gen = sampling.initial_noise(5, 1, 4, 64, 96)
    want = sampling.sample(dit, pos, neg, noise, generator=gen, steps=6, cfg=4.5, scheduler="euler_ancestral",
                           init_latents=latent["samples"] * scale, denoise=0.5) / scale
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------- memory

def _fused_bf16(n: int, tokens: int) -> int:
    """dit_memory.inference_memory written out for a bf16 DiT of width INNER with a fused SDPA kernel (its default
    16 heads): the feed-forward's 12 rows of 2 bytes against attention's 6 x 2 + 4 bytes per row plus 4 bytes per
    head and token; the feed-forward is larger."""
    rows = n * tokens * INNER
    feed_forward, attention = rows * 12 * 2, rows * (6 * 2 + 4) + n * 16 * tokens * 4
    assert feed_forward > attention
    return feed_forward + RESERVE


@pytest.mark.parametrize("cfg,passes", [(1.0, 1), (1.5, 2), (2.0, 2)])
def test_the_memory_asked_is_one_tiles_in_the_dits_dtype_with_cfg_above_1(comfy, conds, monkeypatch, cfg, passes):
    """A bf16 DiT on the CPU (fused SDPA), a 128x64 canvas in two 64x64 tiles (16 tokens each): ComfyUI is asked for
    one tile's forward, whose batch doubles when cfg > 1 (cfg 1.0: one pass; 1.5 and 2.0: two)."""
    import comfy.model_management as mm

    dit = tiny.make_dit().to(torch.bfloat16)
    _inner(dit)
    loads = record_loads(mm, monkeypatch)
    _execute(comfy, dit_handle(dit, "sigma-1024"), conds, _latent(8, 16), cfg=cfg)
    per_pass = {1: 55_296, 2: 110_592}[passes]  # 16 tokens x 144 x 12 rows x 2 bytes per pass
    assert _fused_bf16(passes, 16) == per_pass + RESERVE
    assert [m for names, m in loads if names == DIT] == [per_pass + RESERVE]


def _dit_on(device: torch.device, dtype: torch.dtype = torch.float32):
    loading, types_, variants = pack("nodes.comfy.loading"), pack("nodes.types"), pack("pixart_core.variants")
    dit = tiny.make_dit().to(dtype)
    return dit, types_.DiTHandle(loading.wrap(dit, device, CPU), variants.PRESETS["sigma-1024"], "tiny-sigma-1024",
                                 "test")


def test_on_a_gpu_without_bf16_kernels_the_math_kernels_memory_is_asked(comfy, conds, monkeypatch):
    """A bf16 DiT on a (fake) Turing GPU, sm75: SDPA has no memory-efficient bf16 kernel there, so its math kernel
    runs and the tile's whole score matrices are counted (dit_memory: residual, norm, q, k, v and output in bf16,
    their fp32 copies and the scaled q, k and fp32 output: 36 bytes per row; scores and softmax 2 x 16 heads x
    tokens^2 x 4 bytes per pass). The DiT computes there, ComfyUI's previewer is made for that GPU (where a TAESD
    previewer would run), and the refined latent comes back to ComfyUI's intermediate device, the CPU."""
    import comfy.model_management as mm

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    previewers = record_previewers(monkeypatch)
    dit, handle = _dit_on(CUDA, torch.bfloat16)
    _inner(dit)
    inputs = []
    dit.register_forward_pre_hook(lambda module, args: inputs.append(args[0].device))
    loads = record_loads(mm, monkeypatch)
    n, tokens = 2, 16  # cfg 4.5: two passes; a 64x64 tile
    rows = n * tokens * INNER
    math = rows * (6 * 2 + 3 * 4 + 3 * 4) + 2 * n * 16 * tokens * tokens * 4
    assert math == 231_424 and math > rows * 12 * 2
    with comfy_sees(FakeCuda(1 << 34)):
        out = _execute(comfy, handle, conds, _latent(8, 16))
        assert out["samples"].device == CPU
    assert [m for names, m in loads if names == DIT] == [math + RESERVE]
    assert previewers == [CUDA]
    assert set(inputs) == {CUDA} and len(inputs) == 2  # two tiles, one step


# -------------------------------------------------------------------------------------------------- ControlNet

def test_a_controlnet_adds_its_streams_per_cfg_pass_and_hints_the_whole_canvas(comfy, conds, tmp_path, monkeypatch):
    """An fp32 DiT with one ControlNet on the CPU, a 128x64 canvas in two 64x64 tiles: DiT and ControlNet load
    together, asking for one tile's forward (fused SDPA: 12 rows of 4 bytes per pass) plus what the ControlNet keeps
    beside the DiT's stream, its control stream and block output, 2 x passes x 16 tokens x 144 x 4 bytes (one pass at
    cfg 1.0, two at 1.5). The hint is encoded once, at the canvas's latent size (8 x 16), not a tile's."""
    import comfy.model_management as mm

    loading, types_ = pack("nodes.comfy.loading"), pack("nodes.types")
    cn_files = pack("pixart_core.controlnet_files")
    dit, handle = _dit_on(CPU)
    _inner(dit)
    path = cfiles.write_adapter_file(tmp_path / "tiny-controlnet.safetensors", cfiles.adapter_state_dict(dit, 1))
    adapter = cn_files.load_controlnet(path, torch.float32)[0]
    controlnet = types_.ControlNetHandle(loading.wrap(adapter, CPU, CPU), "tiny-controlnet.safetensors", None, "")
    vae = types_.VAEHandle(loading.wrap(tiny.make_vae(), CPU, CPU), "tiny_sdxl_vae.safetensors", "sdxl")
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    applied = types_.AppliedControl(controlnet, image, vae, 1.0, 0.0, 1.0)
    controlled = dataclasses.replace(handle, controls=(applied,))
    loads = record_loads(mm, monkeypatch)
    for cfg, passes in ((1.0, 1), (1.5, 2)):
        del loads[:]
        _execute(comfy, controlled, conds, _latent(8, 16), cfg=cfg)
        tile = passes * 16 * INNER * 12 * 4 + RESERVE
        extra = 2 * passes * 16 * INNER * 4
        assert [m for names, m in loads if names == DIT_AND_CONTROLNET] == [tile + extra], cfg
    assert list(applied.hints) == [(8, 16)] and applied.hints[8, 16].shape == (1, 4, 8, 16)

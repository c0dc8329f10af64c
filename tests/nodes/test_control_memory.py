"""What ControlNets at sampling time ask of ComfyUI's memory (nodes/control_jobs): the hint's VAE load asks for
ComfyUI's own VAE-encode estimate for the whole batch of control images and tiles only past the free memory ComfyUI
reports; an encode that runs out of memory anyway retries in tiles and says so; a VAE that ComfyUI loaded in part
still encodes on the GPU. The DiT and its ControlNets are loaded in one call that asks for what the ControlNets'
streams add, and the model runs on the DiT's load device."""
from __future__ import annotations

import copy
import logging

import torch

from harness import controlnet_files as cfiles
from harness import models as tiny
from harness.comfyui import pack
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees
from harness.fake_gpu import META, fake_gpu
from harness.recording import record_calls, record_loads, wide_first_vae

CPU = torch.device("cpu")
SCALE = 0.13025  # the SDXL VAE's latent scale, which PixArt-Σ uses ([Σ-repo] configs/PixArt_xl2_internal.py:58)
def _applied(image: torch.Tensor, vae, load_device: torch.device = CPU):
    loading, types_ = pack("nodes.comfy.loading"), pack("nodes.types")
    handle = types_.VAEHandle(loading.wrap(vae, load_device, CPU), "tiny_sdxl_vae.safetensors", "sdxl")
    controlnet = types_.ControlNetHandle(None, "tiny-controlnet.safetensors", None, "")  # only its name is read here
    return types_.AppliedControl(controlnet, image, handle, 1.0, 0.0, 1.0)


def _tiled_reference(vae, images: torch.Tensor, tile: int) -> torch.Tensor:
    """diffusers' tiled encode at `tile` image pixels (its posterior mean) times SCALE, on the CPU."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ref = copy.deepcopy(vae)
    ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // 8
    with torch.no_grad():
        return DiagonalGaussianDistribution(ref._tiled_encode(images.movedim(-1, 1) * 2 - 1)).mode() * SCALE


def test_the_hint_asks_comfyui_for_its_encode_estimate_and_tiles_only_past_free_memory(comfy, monkeypatch):
    """Two 48x64 control images, a bf16 VAE: the load asks for ComfyUI's AutoencoderKL encode estimate (comfy/sd.py
    0.3.75, VAE.memory_used_encode: 1767 bytes per pixel per dtype byte, for its 128-wide encoder; here scaled to
    the first width, 32) times the two images. With exactly that much free the hint is encoded whole; with one byte
    less, in tiles (diffusers' tiled encoder), and the same latents come out."""
    import comfy.model_management as mm

    jobs = pack("nodes.control_jobs")
    vae = wide_first_vae(torch.bfloat16)
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    need = 2 * (1767 * 48 * 64 * 2 * 32 // 128)  # two images, 2 bytes (bf16), width 32 of 128
    assert need == 5_428_224
    loads, tiled = record_loads(mm, monkeypatch), record_calls(vae, "_tiled_encode")
    got = {}
    for free in (need, need - 1):
        monkeypatch.setattr(mm, "get_free_memory",
                            lambda dev=None, torch_free_too=False, f=free: (f, f) if torch_free_too else f)
        got[free] = jobs.hint(_applied(images, vae), (6, 8), SCALE)
        assert loads[-1] == (["AutoencoderKL"], need)
        assert len(tiled) == (free < need), f"free {free} of {need}: tiled {len(tiled)} times"
    assert got[need].shape == (2, 4, 6, 8)
    torch.testing.assert_close(got[need - 1], got[need], atol=2e-2, rtol=0)  # one tile covers 48x64 (bf16)


def test_a_hint_encode_that_runs_out_of_memory_retries_in_tiles_and_says_so(comfy, caplog):
    """ComfyUI reports more free memory than the GPU has (another program took it): the whole-image encode of a
    768x640 control image runs out of memory on a fake GPU with room for a 512-pixel tile's encode only; the hint is
    encoded again in tiles, with a warning naming the encode and its size, and equals diffusers' tiled encode."""
    import comfy.model_management as mm

    jobs, core_vae = pack("nodes.control_jobs"), pack("pixart_core.vae")
    vae = wide_first_vae()
    images = torch.rand(1, 768, 640, 3, generator=torch.Generator().manual_seed(2))
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    peaks = {}
    for tiles in (False, True):  # what each encode needs beyond the weights, measured on a roomy fake GPU
        with FakeCuda(1 << 40) as gpu:
            model = copy.deepcopy(vae).to(CUDA)
            core_vae.encode(model, images, tiled=tiles, device=CUDA)
            peaks[tiles] = gpu.peak - weights
    assert peaks[False] > 1.5 * peaks[True], peaks
    total = weights + (peaks[False] + peaks[True]) // 2
    caplog.set_level(logging.INFO)
    with comfy_sees(FakeCuda(total)):
        plenty = 1 << 40
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (plenty, plenty) if torch_free_too else plenty
        got = jobs.hint(_applied(images, vae, CUDA), (96, 80), SCALE)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "VAE" in r.getMessage()]
    assert warnings == ["PixArt VAE encode ran out of memory at 640x768; retrying in tiles."]
    torch.testing.assert_close(got, _tiled_reference(vae, images, 512), atol=1e-5, rtol=1e-5)


def test_a_vae_loaded_in_part_encodes_the_hint_on_the_gpu(comfy):
    """On a fake GPU with room for about half the VAE beside ComfyUI's inference reserve, ComfyUI loads the larger
    layers and leaves the rest (the 3-channel input convolution among them) in system memory to stream: the control
    image still goes to the GPU (on a real one, a CPU input meeting the loaded layers' CUDA weights fails), and the
    hint equals the whole VAE's on the CPU."""
    import comfy.model_management as mm

    jobs, loading = pack("nodes.control_jobs"), pack("nodes.comfy.loading")
    vae = wide_first_vae()
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = vae.encode(images.movedim(-1, 1) * 2 - 1).latent_dist.mean * SCALE
    applied = _applied(images, vae, CUDA)
    size = applied.vae.patcher.model_size()
    inputs = []
    vae.encoder.register_forward_pre_hook(lambda module, args: inputs.append(args[0].device))
    with comfy_sees(FakeCuda(int(mm.minimum_inference_memory()) + size // 2)) as gpu:
        loading.use(applied.vae.patcher)
        assert applied.vae.patcher.loaded_size() < size
        assert not gpu.holds(vae.encoder.conv_in.weight), "the VAE's first layer was loaded: nothing to show"
        got = jobs.hint(applied, (8, 8), SCALE)
    assert inputs == [CUDA]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_dit_and_its_controlnets_load_together_asking_for_their_streams(comfy, tmp_path, monkeypatch):
    """A bf16 DiT with one ControlNet on a (meta) GPU: one load_models_gpu call with both, asking for the sampler's
    memory plus what the ControlNet keeps beside the DiT's stream: its control stream and its block output,
    [batch, tokens, inner] each, in the DiT's dtype (a hand computation below); the model returned runs on the DiT's
    load device."""
    import dataclasses

    import comfy.model_management as mm

    jobs, loading, types_ = pack("nodes.control_jobs"), pack("nodes.comfy.loading"), pack("nodes.types")
    cn_files, core_cn = pack("pixart_core.controlnet_files"), pack("pixart_core.controlnet")
    dit = tiny.make_dit()
    path = cfiles.write_adapter_file(tmp_path / "tiny-controlnet.safetensors", cfiles.adapter_state_dict(dit, 1))
    adapter = cn_files.load_controlnet(path, torch.bfloat16)[0]
    variant = tiny.variant_for("tiny-dit.safetensors")
    handle = types_.DiTHandle(loading.wrap(dit.to(torch.bfloat16), META, CPU), variant, "tiny-dit.safetensors", "")
    controlnet = types_.ControlNetHandle(loading.wrap(adapter, META, CPU), "tiny-controlnet.safetensors", None, "")
    vae = types_.VAEHandle(loading.wrap(tiny.make_vae(), CPU, CPU), "tiny_sdxl_vae.safetensors", "sdxl")
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    controlled = dataclasses.replace(handle, controls=(types_.AppliedControl(controlnet, image, vae, 1.0, 0.0, 1.0),))
    inner = dit.config.num_attention_heads * dit.config.attention_head_dim
    assert inner == 144
    # batch 2 (CFG) of 48x64 pixels: (48 // 16) * (64 // 16) = 12 tokens; 2 tensors x 2 x 12 x 144 x 2 bytes (bf16)
    extra = 2 * 2 * 12 * 144 * 2
    loads = record_loads(mm, monkeypatch)
    with fake_gpu(mm.VRAMState.NORMAL_VRAM, 64 << 30):
        ready = jobs.load(controlled, (6, 8), 1, (2, 48, 64), 1000)
    assert loads[-1] == (["ControlNetAdapter", "PixArtTransformer2DModel"], 1000 + extra)
    assert isinstance(ready.model, core_cn.ControlledDiT)
    assert ready.device == META

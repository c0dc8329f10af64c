"""PixArt-Σ Hires Upscale's VAE path (method 'vae': decode, upscale, encode) under ComfyUI's memory management: each
VAE job asks for ComfyUI's own estimate and tiles only past the free memory ComfyUI reports; a job that runs out of
memory anyway retries in tiles, and says which job and at what size; latents of the other latent space are
refused before anything is decoded."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from harness.comfyui import pack
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees
from harness.recording import record_calls, record_loads, wide_first_vae

CPU = torch.device("cpu")
VIA_VAE = "vae (decode, upscale, encode)"  # the node's method widget, as a saved workflow holds it


def _handle(vae, load_device: torch.device = CPU, family: str = "sdxl"):
    loading, types_ = pack("nodes.comfy.loading"), pack("nodes.types")
    return types_.VAEHandle(loading.wrap(vae, load_device, CPU), "tiny_sdxl_vae.safetensors", family)


def _upscale(comfy, z: torch.Tensor, handle, width: int, height: int, **samples):
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    return node.execute(samples={"samples": z, **samples}, family="2048", method=VIA_VAE, upscale_mode="bicubic",
                        width=width, height=height, vae=handle).result


def test_each_vae_job_asks_for_comfyuis_estimate_and_tiles_only_past_free_memory(comfy, monkeypatch):
    """Two 6x8 latents, a bf16 VAE whose first width is 32, upscaled to the same 64x48 (so only the VAE jobs run).
    The decode asks for ComfyUI's AutoencoderKL decode estimate (comfy/sd.py 0.3.75, VAE.memory_used_decode: 2178
    bytes per latent pixel x 64 per dtype byte, for one image: it decodes one at a time), the encode for its encode
    estimate (memory_used_encode: 1767 bytes per pixel per dtype byte) for both images, each scaled to width 32 of
    the released 128. ComfyUI's free memory is set at each boundary: a job tiles (diffusers' tiled decoder or
    encoder runs) exactly when it needs more than is free."""
    import comfy.model_management as mm

    vae = wide_first_vae(torch.bfloat16)
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    decode = 2178 * 6 * 8 * 64 * 2 * 32 // 128  # one image, bf16, width 32 of 128
    encode = 2 * (1767 * 48 * 64 * 2 * 32 // 128)  # two 64x48 images
    assert (decode, encode) == (3_345_408, 5_428_224)
    loads = record_loads(mm, monkeypatch)
    decodes, encodes = record_calls(vae, "tiled_decode"), record_calls(vae, "_tiled_encode")
    for free in (decode - 1, decode, encode - 1, encode):
        monkeypatch.setattr(mm, "get_free_memory",
                            lambda dev=None, torch_free_too=False, f=free: (f, f) if torch_free_too else f)
        del loads[:], decodes[:], encodes[:]
        out, w, h = _upscale(comfy, z, _handle(vae), 64, 48)
        assert (w, h) == (64, 48) and out["samples"].shape == (2, 4, 6, 8)
        assert loads == [(["AutoencoderKL"], decode), (["AutoencoderKL"], encode)]
        assert (len(decodes), len(encodes)) == (2 * (free < decode), free < encode), free


def test_a_vae_job_that_runs_out_of_memory_retries_in_tiles_and_says_which_and_where(comfy, caplog):
    """ComfyUI reports more free memory than the GPU has (another program took it): on a fake GPU with room for a
    tiled decode and a tiled encode only, the whole-image decode of 96x80 latents (640 wide, 768 high) runs out of
    memory, and so does the encode at the target size; each retries in tiles with a warning naming the job and the
    size, and the latents equal diffusers' tiled decode then tiled encode (64-latent-pixel tiles)."""
    import comfy.model_management as mm
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    core_vae = pack("pixart_core.vae")
    vae = wide_first_vae()
    z = torch.randn(1, 4, 96, 80, generator=torch.Generator().manual_seed(2))
    images = torch.rand(1, 768, 640, 3, generator=torch.Generator().manual_seed(3))
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    peaks = {}
    for tiles in (False, True):  # what each job needs beyond the weights, measured on a roomy fake GPU
        for job, run in (("decode", lambda m: core_vae.decode(m, z, tiled=tiles, device=CUDA)),
                         ("encode", lambda m: core_vae.encode(m, images, tiled=tiles, device=CUDA))):
            with FakeCuda(1 << 40) as gpu:
                run(copy.deepcopy(vae).to(CUDA))
                peaks[job, tiles] = gpu.peak - weights
    tiled = max(peaks["decode", True], peaks["encode", True])
    whole = min(peaks["decode", False], peaks["encode", False])
    assert whole > 1.2 * tiled, peaks
    caplog.set_level(logging.INFO)
    with comfy_sees(FakeCuda(weights + (tiled + whole) // 2)):
        plenty = 1 << 40
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (plenty, plenty) if torch_free_too else plenty
        out, w, h = _upscale(comfy, z, _handle(vae, CUDA), 640, 768)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "VAE" in r.getMessage()]
    assert warnings == ["PixArt VAE decode ran out of memory at 640x768; retrying in tiles.",
                        "PixArt VAE encode ran out of memory at 640x768; retrying in tiles."]
    ref = copy.deepcopy(vae)
    ref.tile_latent_min_size, ref.tile_sample_min_size = 64, 512
    with torch.no_grad():
        decoded = (ref.tiled_decode(z).sample / 2 + 0.5).clamp(0, 1)
        want = DiagonalGaussianDistribution(ref._tiled_encode(decoded * 2 - 1)).mode()
    torch.testing.assert_close(out["samples"], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("space,family,other", [("sd", "sdxl", "the SDXL VAE (PixArt-Σ)"),
                                                ("sdxl", "sd", "the SD 1.x VAE (PixArt-α)")])
def test_latents_of_the_other_latent_space_are_refused_before_decoding(comfy, space, family, other):
    """SD-space latents with the SDXL VAE (and the reverse) would decode to wrong colours: refused, naming the VAE and
    what to load; nothing is decoded."""
    vae = wide_first_vae()
    decodes = record_calls(vae, "decode")
    wanted = {"sd": "the SD 1.x VAE (PixArt-α)", "sdxl": "the SDXL VAE (PixArt-Σ)"}[space]
    with pytest.raises(ValueError) as e:
        _upscale(comfy, torch.zeros(1, 4, 6, 8), _handle(vae, family=family), 64, 48, pixart_latent_space=space)
    assert str(e.value) == (f"These latents are in the {space.upper()} latent space, but tiny_sdxl_vae.safetensors is "
                            f"{other}. Load {wanted}: sdxl_vae.safetensors for PixArt-Σ, "
                            "vae-ft-mse-840000-ema-pruned.safetensors for PixArt-α.")
    assert decodes == []


def test_a_vae_loaded_in_part_runs_both_jobs_on_the_gpu(comfy):
    """On a fake GPU with room for about half the VAE beside ComfyUI's inference reserve, ComfyUI leaves the smaller
    layers (the VAE's first parameter among them) in system memory to stream: the latents and then the upscaled image
    still go to the GPU (on a real one, a CPU input meeting the loaded layers' CUDA weights fails)."""
    import comfy.model_management as mm

    loading = pack("nodes.comfy.loading")
    vae = wide_first_vae()
    handle = _handle(vae, CUDA)
    size = handle.patcher.model_size()
    inputs = {"decode": [], "encode": []}
    vae.post_quant_conv.register_forward_pre_hook(lambda m, args: inputs["decode"].append(args[0].device))
    vae.encoder.register_forward_pre_hook(lambda m, args: inputs["encode"].append(args[0].device))
    with comfy_sees(FakeCuda(int(mm.minimum_inference_memory()) + size // 2)) as gpu:
        loading.use(handle.patcher)
        assert handle.patcher.loaded_size() < size
        assert not gpu.holds(next(vae.parameters())), "the VAE's first parameter was loaded: nothing to show"
        _upscale(comfy, torch.randn(1, 4, 6, 8), handle, 64, 48)
    assert inputs == {"decode": [CUDA], "encode": [CUDA]}


def test_the_upscale_between_decode_and_encode_uses_the_mode_chosen(comfy):
    """'nearest-exact' (not the default bicubic) between diffusers' decode and encode, to a size of the same aspect
    ratio: ComfyUI's own comfy.utils.common_upscale (no crop), as the latent path's modes are tested."""
    from comfy.utils import common_upscale

    vae = wide_first_vae()
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(4))
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    out = node.execute(samples={"samples": z}, family="2048", method=VIA_VAE, upscale_mode="nearest-exact",
                       width=128, height=96, vae=_handle(vae)).result[0]
    with torch.no_grad():
        image = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)  # [1, 3, 48, 64]
        image = common_upscale(image, 128, 96, "nearest-exact", "disabled")
        want = vae.encode(image.clamp(0, 1) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(out["samples"], want, atol=1e-5, rtol=1e-5)


def test_the_upscaled_latent_goes_to_comfyuis_intermediate_device(comfy, monkeypatch):
    """ComfyUI started with --gpu-only keeps node outputs on the GPU (model_management.intermediate_device answers
    its torch device): the upscaled LATENT goes there (a fake GPU here)."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "intermediate_device", lambda: CUDA)
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaHiresUpscale"]
    with FakeCuda(1 << 40) as gpu:
        out = node.execute(samples={"samples": torch.randn(1, 4, 6, 8)}, family="2048", method="latent",
                           upscale_mode="bicubic", width=96, height=80).result[0]
        assert out["samples"].device == CUDA and gpu.holds(out["samples"])

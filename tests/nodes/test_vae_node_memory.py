"""PixArt-Σ VAE Loader, VAE Decode and VAE Encode (nodes/vae.py) as ComfyUI runs them, under its memory management.

The loader: 'auto' dtype and devices are ComfyUI's for its own VAE; the handle keeps the file's name and family.
Decode and Encode: each asks ComfyUI for its own AutoencoderKL estimate (comfy/sd.py 0.3.75) and tiles exactly past
the free memory ComfyUI reports, also when a prompt leaves `tiling` out (older API prompts: 'auto'); 'always' tiles a
job that fits; an out-of-memory error on a fake GPU gives the retry warning and the messages naming the job and the
image size ('never' says what to set); the job's input goes to the GPU even when ComfyUI loaded the VAE in part;
Decode's target size, its refusals (half a target size, latents of the other latent space) and its progress bar;
Encode's refusal of a size that is not a multiple of 16 and the LATENT it gives (on ComfyUI's intermediate device,
tagged with the VAE's latent space)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from harness.comfyui import pack
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees
from harness.recording import record_calls, record_loads, wide_first_vae

CPU = torch.device("cpu")
NAME = "tiny_sdxl_vae.safetensors"  # the tiny SDXL VAE file the tests' ComfyUI has in models/vae


def _handle(vae, load_device: torch.device = CPU, family: str | None = "sdxl"):
    loading, types_ = pack("nodes.comfy.loading"), pack("nodes.types")
    return types_.VAEHandle(loading.wrap(vae, load_device, CPU), NAME, family)


def _free(mm, monkeypatch, free: int) -> None:
    """ComfyUI's free-memory query answers `free` bytes (on every device)."""
    monkeypatch.setattr(mm, "get_free_memory",
                        lambda dev=None, torch_free_too=False, f=free: (f, f) if torch_free_too else f)


def _node(comfy, name: str):
    return comfy.NODE_CLASS_MAPPINGS[f"PixArtSigma{name}"]


def _reference_decode(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' whole-image decode, as an IMAGE ([B,H,W,3] in 0..1)."""
    with torch.no_grad():
        return (vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("native", [False, True])
def test_vae_loader_auto_dtype_devices_name_and_family_are_comfyuis(comfy, monkeypatch, native):
    """dtype 'auto' on a CPU: bf16 where the CPU computes bf16 natively (AVX512-BF16/AMX), else fp32 (ComfyUI 0.3.75's
    vae_dtype answers fp32 on a CPU; the pack's CPU rule, tests/nodes/test_gpu_readiness.py's table); the patcher
    loads on ComfyUI's VAE device and offloads to its VAE offload device; the handle keeps the file name and the
    family its name says (sdxl)."""
    import comfy.model_management as mm

    dtypes = sys.modules[pack("nodes.comfy.devices").dtypes.__name__]
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda *a: {"avx512f"} | ({"avx512_bf16"} if native else set()))
    monkeypatch.setattr(dtypes.sys, "platform", "linux")
    dtypes.cpu_native_bf16.cache_clear()
    try:
        handle = _node(comfy, "VAELoader").execute(vae_name=NAME, dtype="auto").result[0]
    finally:
        dtypes.cpu_native_bf16.cache_clear()
    inner = handle.patcher.model.inner
    assert type(inner).__name__ == "AutoencoderKL"
    assert {p.dtype for p in inner.parameters()} == {torch.bfloat16 if native else torch.float32}
    assert (handle.patcher.load_device, handle.patcher.offload_device) == (mm.vae_device(), mm.vae_offload_device())
    assert (handle.name, handle.family) == (NAME, "sdxl")


# --------------------------------------------------------------------------------------------------- decode

def test_decode_asks_for_comfyuis_estimate_and_tiles_only_past_free_memory(comfy, monkeypatch):
    """Two 6x8 latents (SDXL latent space), a bf16 VAE whose first width is 32, and a prompt that sets neither
    tiling nor a target size (an older API prompt): the load asks for ComfyUI's AutoencoderKL decode estimate
    (comfy/sd.py 0.3.75, VAE.memory_used_decode: 2178 bytes per latent pixel x 64 per dtype byte) for one image (it
    decodes one at a time), scaled to width 32 of the released 128. With exactly that much free both images are
    decoded whole; with one byte less, each in tiles (diffusers' tiled decoder), as 'auto' does."""
    import comfy.model_management as mm

    vae = wide_first_vae(torch.bfloat16)
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1))
    need = 2178 * 6 * 8 * 64 * 2 * 32 // 128  # one image, 2 bytes (bf16), width 32 of 128
    assert need == 3_345_408
    want = _reference_decode(vae, z)
    loads, tiles = record_loads(mm, monkeypatch), record_calls(vae, "tiled_decode")
    handle = _handle(vae)
    for free in (need, need - 1):
        _free(mm, monkeypatch, free)
        del loads[:], tiles[:]
        images = _node(comfy, "VAEDecode").execute(vae=handle, samples={"samples": z, "pixart_latent_space": "sdxl"})
        assert loads == [(["AutoencoderKL"], need)]
        assert tiles == [(1, 4, 6, 8)] * 2 * (free < need), f"free {free} of {need}"
        assert images.result[0].shape == (2, 48, 64, 3)
        torch.testing.assert_close(images.result[0], want, atol=2e-2, rtol=0)  # one tile covers 6x8 (bf16)


def test_decode_always_tiles_a_decode_that_fits(comfy, monkeypatch):
    """tiling 'always' with plenty of memory free: diffusers' tiled decoder runs, once per image."""
    import comfy.model_management as mm

    vae = wide_first_vae()
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    tiles = record_calls(vae, "tiled_decode")
    _free(mm, monkeypatch, 1 << 40)
    images = _node(comfy, "VAEDecode").execute(vae=_handle(vae), samples={"samples": z}, tiling="always").result[0]
    assert tiles == [(1, 4, 6, 8)] * 2
    torch.testing.assert_close(images, _reference_decode(vae, z), atol=1e-5, rtol=1e-5)


def test_decode_resizes_and_centre_crops_to_the_target_size(comfy):
    """6x8 latents (64 wide, 48 high) with a 40x40 target: scaled to cover by max(40/48, 40/64) (48x64 -> 40x53,
    sides truncated as diffusers' resize_and_crop_tensor does), bilinear, then the middle 40 columns (from 6)."""
    vae = wide_first_vae()
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        decoded = vae.decode(z).sample
    scaled = torch.nn.functional.interpolate(decoded, size=(40, 53), mode="bilinear", align_corners=False)
    want = (scaled[..., 0:40, 6:46] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = _node(comfy, "VAEDecode").execute(vae=_handle(vae), samples={"samples": z}, tiling="never",
                                            target_width=40, target_height=40).result[0]
    assert got.shape == (1, 40, 40, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width,height", [(40, 0), (0, 40)])
def test_decode_refuses_half_a_target_size(comfy, width, height):
    vae = wide_first_vae()
    decodes = record_calls(vae, "decode")
    with pytest.raises(ValueError) as e:
        _node(comfy, "VAEDecode").execute(vae=_handle(vae), samples={"samples": torch.zeros(1, 4, 6, 8)},
                                          target_width=width, target_height=height)
    assert str(e.value) == "PixArt VAE decode: set both target_width and target_height, or neither (0)."
    assert decodes == []


def test_decode_refuses_latents_of_the_other_latent_space(comfy):
    """SD-space latents with the SDXL VAE would decode to wrong colours: refused, naming the VAE file and what to
    load; nothing is decoded."""
    vae = wide_first_vae()
    decodes = record_calls(vae, "decode")
    with pytest.raises(ValueError) as e:
        _node(comfy, "VAEDecode").execute(vae=_handle(vae),
                                          samples={"samples": torch.zeros(1, 4, 6, 8), "pixart_latent_space": "sd"})
    assert str(e.value) == ("These latents are in the SD latent space, but tiny_sdxl_vae.safetensors is the SDXL VAE "
                            "(PixArt-Σ). Load the SD 1.x VAE (PixArt-α): sdxl_vae.safetensors for PixArt-Σ, "
                            "vae-ft-mse-840000-ema-pruned.safetensors for PixArt-α.")
    assert decodes == []


def test_decode_moves_comfyuis_progress_bar_once_per_image(comfy):
    """A batch of 2: ComfyUI's progress hook sees 1 of 2, then 2 of 2."""
    import comfy.utils as comfy_utils

    seen, before = [], comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append((v, t)))
    try:
        _node(comfy, "VAEDecode").execute(vae=_handle(wide_first_vae()), samples={"samples": torch.zeros(2, 4, 6, 8)})
    finally:
        comfy_utils.set_progress_bar_global_hook(before)
    assert seen == [(1, 2), (2, 2)]


# --------------------------------------------------------------------------------------------------- encode

def test_encode_asks_for_comfyuis_estimate_and_tiles_only_past_free_memory(comfy, monkeypatch):
    """Two 48x64 images, a bf16 VAE whose first width is 32, and a prompt that leaves tiling out (an older API
    prompt): the load asks for ComfyUI's AutoencoderKL encode estimate (comfy/sd.py 0.3.75, VAE.memory_used_encode:
    1767 bytes per pixel per dtype byte, for its 128-wide encoder; here scaled to width 32) times the two images.
    With exactly that much free the images are encoded whole; with one byte less, in tiles (diffusers' tiled
    encoder), as 'auto' does. The LATENT is the posterior mean, tagged with the VAE's latent space."""
    import comfy.model_management as mm

    vae = wide_first_vae(torch.bfloat16)
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    need = 2 * (1767 * 48 * 64 * 2 * 32 // 128)  # two images, 2 bytes (bf16), width 32 of 128
    assert need == 5_428_224
    with torch.no_grad():
        want = vae.encode((images.movedim(-1, 1) * 2 - 1).to(torch.bfloat16)).latent_dist.mode().float()
    loads, tiles = record_loads(mm, monkeypatch), record_calls(vae, "_tiled_encode")
    handle = _handle(vae)
    for free in (need, need - 1):
        _free(mm, monkeypatch, free)
        del loads[:], tiles[:]
        latent = _node(comfy, "VAEEncode").execute(vae=handle, image=images).result[0]
        assert loads == [(["AutoencoderKL"], need)]
        assert tiles == [(2, 3, 48, 64)] * (free < need), f"free {free} of {need}"
        assert sorted(latent) == ["pixart_latent_space", "samples"] and latent["pixart_latent_space"] == "sdxl"
        torch.testing.assert_close(latent["samples"], want, atol=2e-2, rtol=0)  # one tile covers 48x64 (bf16)


def test_encode_always_tiles_an_encode_that_fits(comfy, monkeypatch):
    """tiling 'always' with plenty of memory free: diffusers' tiled encoder runs; a VAE of unknown family gives a
    LATENT without a latent space."""
    import comfy.model_management as mm

    vae = wide_first_vae()
    images = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(5))
    tiles = record_calls(vae, "_tiled_encode")
    _free(mm, monkeypatch, 1 << 40)
    latent = _node(comfy, "VAEEncode").execute(vae=_handle(vae, family=None), image=images, tiling="always").result[0]
    assert tiles == [(1, 3, 48, 64)]
    assert list(latent) == ["samples"] and latent["samples"].shape == (1, 4, 6, 8)


@pytest.mark.parametrize("width,height,wrong", [(50, 48, "width 50 is not a multiple of 16 (patch 2 x VAE 8); "
                                                          "use 48 or 64."),
                                                (48, 40, "height 40 is not a multiple of 16 (patch 2 x VAE 8); "
                                                         "use 32 or 48.")])
def test_encode_refuses_a_size_that_is_not_a_multiple_of_16(comfy, width, height, wrong):
    """The refusal names the image's size, the side, its neighbouring multiples of 16 (by hand) and what to do;
    nothing is encoded."""
    vae = wide_first_vae()
    encodes = record_calls(vae, "encode")
    with pytest.raises(ValueError) as e:
        _node(comfy, "VAEEncode").execute(vae=_handle(vae), image=torch.zeros(1, height, width, 3))
    assert str(e.value) == (f"PixArt VAE encode: the image is {width}x{height}: {wrong} Crop or resize it (e.g. with "
                            "ImageScale).")
    assert encodes == []


def test_encode_gives_its_latent_on_comfyuis_intermediate_device(comfy, monkeypatch):
    """ComfyUI started with --gpu-only keeps node outputs on the GPU (model_management.intermediate_device answers
    its torch device): the LATENT's samples go there (a fake GPU here)."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "intermediate_device", lambda: CUDA)
    with FakeCuda(1 << 40) as gpu:
        latent = _node(comfy, "VAEEncode").execute(vae=_handle(wide_first_vae()),
                                                   image=torch.rand(1, 48, 64, 3)).result[0]
        assert latent["samples"].device == CUDA and gpu.holds(latent["samples"])


# ------------------------------------------------------------------------------------- on a (fake) GPU

def _oom_gpu(vae) -> FakeCuda:
    """A fake GPU with room for the VAE's weights and 100 kB: ComfyUI loads the VAE whole (its free-memory query says
    plenty), and the first full-resolution activation of a 48x64 image (32 channels, fp32: 393 kB) does not fit,
    whole or in tiles."""
    return FakeCuda(sum(p.numel() * p.element_size() for p in vae.parameters()) + 100_000)


JOBS = {  # job: (node, its input, the message's size: width x height)
    "decode": ("VAEDecode", "samples", "64x48"),
    "encode": ("VAEEncode", "image", "64x48"),
}


def _run_on(comfy, job: str, handle, tiling: str):
    node, what, _ = JOBS[job]
    given = {"samples": torch.zeros(1, 4, 6, 8)} if job == "decode" else torch.rand(1, 48, 64, 3)
    return _node(comfy, node).execute(vae=handle, tiling=tiling, **{what: given})


@pytest.mark.parametrize("job", list(JOBS))
def test_out_of_memory_with_tiling_never_says_what_to_set(comfy, job):
    """ComfyUI reports more free memory than the GPU has (another program took it): the whole job runs out of memory
    on the fake GPU; with 'never' nothing is retried and the message names the job, the image size and the
    setting."""
    import comfy.model_management as mm

    vae = wide_first_vae()
    tiled = record_calls(vae, "tiled_decode" if job == "decode" else "_tiled_encode")
    with comfy_sees(_oom_gpu(vae)):
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (1 << 40, 1 << 40) if torch_free_too else 1 << 40
        with pytest.raises(torch.OutOfMemoryError) as e:
            _run_on(comfy, job, _handle(vae, CUDA), "never")
    assert str(e.value) == (f"PixArt VAE {job} ran out of memory at {JOBS[job][2]}. Set tiling to 'auto' ({job}s in "
                            "tiles when memory runs short) or 'always'.")
    assert tiled == []


def _auto_out_of_memory(comfy, caplog, job: str) -> tuple[BaseException, list[str], int]:
    """The job with 'auto' on the fake GPU that holds neither the whole job nor a tile: (the error it raises, the
    VAE warnings logged, how many times diffusers' tiled decoder or encoder ran)."""
    import comfy.model_management as mm

    vae = wide_first_vae()
    tiled = record_calls(vae, "tiled_decode" if job == "decode" else "_tiled_encode")
    caplog.set_level(logging.INFO)
    with comfy_sees(_oom_gpu(vae)):
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (1 << 40, 1 << 40) if torch_free_too else 1 << 40
        with pytest.raises(torch.OutOfMemoryError) as e:
            _run_on(comfy, job, _handle(vae, CUDA), "auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "VAE" in r.getMessage()]
    return e.value, warnings, len(tiled)


@pytest.mark.parametrize("job", list(JOBS))
def test_out_of_memory_with_tiling_auto_retries_in_tiles_and_says_so(comfy, caplog, job):
    """The same job with 'auto': a warning naming the job and the size, then the retry in tiles (diffusers' tiled
    decoder or encoder runs once), which runs out of memory too."""
    _, warnings, tiled = _auto_out_of_memory(comfy, caplog, job)
    assert warnings == [f"PixArt VAE {job} ran out of memory at {JOBS[job][2]}; retrying in tiles."]
    assert tiled == 1


@pytest.mark.parametrize("job", list(JOBS))
def test_a_retry_in_tiles_that_runs_out_of_memory_too_gives_the_even_in_tiles_advice(comfy, caplog, job):
    """docs/troubleshooting.md: "With tiling `auto` the decode retries in tiles by itself; if tiles also run out,
    free memory ... or decode a smaller image" (the `... even in tiles` message)."""
    error, _, _ = _auto_out_of_memory(comfy, caplog, job)
    assert str(error) == (f"PixArt VAE {job} ran out of memory at {JOBS[job][2]} even in tiles. Free memory (close "
                          f"other programs, or unload models from ComfyUI's menu) or {job} a smaller image.")


@pytest.mark.parametrize("job", list(JOBS))
def test_a_vae_loaded_in_part_runs_the_job_on_the_gpu(comfy, job):
    """On a fake GPU with room for about half the VAE beside ComfyUI's inference reserve, ComfyUI loads the larger
    layers and leaves the rest (the encoder's 3-channel input convolution, the VAE's first parameter, among them) in
    system memory to stream: the image or the latents still go to the GPU (on a real one, a CPU input meeting the
    loaded layers' CUDA weights fails), and the result equals the whole VAE's on the CPU."""
    import comfy.model_management as mm

    loading = pack("nodes.comfy.loading")
    vae = wide_first_vae()
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(6))
    images = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = (_reference_decode(vae, z) if job == "decode"
                else vae.encode(images.movedim(-1, 1) * 2 - 1).latent_dist.mode())
    handle = _handle(vae, CUDA)
    size = handle.patcher.model_size()
    first = vae.post_quant_conv if job == "decode" else vae.encoder  # the first module the job's input meets
    inputs = []
    first.register_forward_pre_hook(lambda module, args: inputs.append(args[0].device))
    with comfy_sees(FakeCuda(int(mm.minimum_inference_memory()) + size // 2)) as gpu:
        loading.use(handle.patcher)
        assert handle.patcher.loaded_size() < size
        assert not gpu.holds(next(vae.parameters())), "the VAE's first parameter was loaded: nothing to show"
        node, what, _ = JOBS[job]
        got = _node(comfy, node).execute(vae=handle, **{what: {"samples": z} if job == "decode" else images})
    got = got.result[0] if job == "decode" else got.result[0]["samples"]
    assert inputs == [CUDA]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

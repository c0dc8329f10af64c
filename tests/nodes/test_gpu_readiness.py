"""What a GPU run does, simulated on the CPU with ComfyUI's own model management (the fake GPU: harness/fake_gpu.py).

A fake GPU is the meta device: ComfyUI's loader moves tensors there as it would to CUDA (shapes, no data), with
ComfyUI's free-memory query patched to a fixed budget minus what is loaded there, and `vram_state` set to each of
ComfyUI's modes. Capability queries (CUDA device properties, the macOS version, CPU flags) are patched to each kind
of device users have. Numbers that need real data are checked on the CPU through the same ComfyUI code paths.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from harness.comfyui import pack
from harness.fake_gpu import (
    CPU,
    META,
    GiB,
    budget_for_partial,
    dit_inputs,
    fake_gpu,
    placement,
)

STATES = ["NORMAL_VRAM", "LOW_VRAM", "NO_VRAM", "HIGH_VRAM", "SHARED"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", ["dit", "t5"])
def test_models_run_on_the_load_device_in_every_vram_state(comfy, state, kind):
    """In every VRAM mode the DiT and T5 compute on ComfyUI's load device. Where ComfyUI loads
    them partially (NORMAL/LOW with too little memory, NO_VRAM always) the rest streams per forward through
    ComfyUI's cast-weights layers; nothing silently stays on the CPU."""
    import comfy.model_management as mm

    management = pack("nodes.comfy.loading")
    model = tiny.make_dit() if kind == "dit" else tiny.make_t5()
    patcher = management.wrap(model, META, CPU)
    total = budget_for_partial(patcher.model_size()) if state in ("NORMAL_VRAM", "LOW_VRAM") else 24 * GiB
    with fake_gpu(mm.VRAMState[state], total):
        ready = management.use(patcher)
        assert ready.device == META
        devices, streamed = placement(ready.model)
        assert devices == {"meta"}, f"{state}: tensors left on {devices - {'meta'}} without a streaming path"
        partial = state in ("NORMAL_VRAM", "LOW_VRAM", "NO_VRAM")
        assert (streamed > 0) == partial, f"{state}: {streamed} layers stream"
        if kind == "dit":
            out = ready.model(**dit_inputs(ready.model, ready.device))[0]
        else:
            out = ready.model(input_ids=torch.tensor([[3, 4, 1]], device=ready.device)).last_hidden_state
        assert out.device == META


def test_quantized_t5_under_novram_runs_on_the_cpu_and_says_so(comfy, tmp_path, caplog):
    """bitsandbytes layers cannot stream, so --novram (which loads nothing whole) leaves the 8-bit
    T5 in system memory: it runs there, and the log says where instead of claiming the GPU."""
    import comfy.model_management as mm

    from pixart_core import t5 as ct5
    from pixart_core import t5_spec

    management = pack("nodes.comfy.loading")
    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    loaded = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
    patcher = management.wrap(loaded.model, META, CPU)
    with fake_gpu(mm.VRAMState.NO_VRAM, 24 * GiB), caplog.at_level(logging.WARNING):
        ready = management.use(patcher)
    assert ready.device == CPU
    assert all(p.device == CPU for p in ready.model.parameters())
    assert any("quantized" in r.getMessage() and "runs on cpu" in r.getMessage() for r in caplog.records)


def test_int8_t5_reload_keeps_one_int8_copy(comfy, int8_t5):
    """Encode prompt A, ComfyUI unloads everything, encode prompt B (and A again). Linear8bitLt.to(),
    which ComfyUI calls on every leaf when it loads, moves `weight` and `state.CB` into two separate tensors; so
    between forwards no layer may hold its int8 matrix in `state` (after the first forward bitsandbytes keeps it
    there: +3.4 GiB of int8 copies on the GPU for T5-XXL), and every int8 matrix is one storage throughout.
    (A moved copy cannot be shown here: moving bitsandbytes' Int8Params to a fake device fails in torch's _apply;
    bench/gpu_check.py measures the reload's peak VRAM on CUDA.)"""
    import bitsandbytes as bnb
    import comfy.model_management as mm

    from pixart_core import t5 as ct5
    from pixart_core.quant import int8_copies

    loaded, tok = int8_t5
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    management = pack("nodes.comfy.loading")
    patcher = management.wrap(loaded.model, CPU, CPU)
    outputs = []
    for prompt in ("prompt a", "prompt b", "prompt a"):
        ready = management.use(patcher)
        outputs.append(ct5.encode(loaded, tok, prompt, 300, ready.device)[0])
        assert all(m.state.CB is None and m.state.SCB is None for m in layers), "int8 state a .to() would copy"
        assert all(m.weight.SCB is not None for m in layers)
        assert int8_copies(loaded.model) == [1] * len(layers)
        mm.unload_all_models()
    assert torch.equal(outputs[0], outputs[2]) and not torch.equal(outputs[0], outputs[1])


def test_patcher_counts_a_tied_embedding_once(comfy):
    """ComfyUI's module_size reads the state dict, which names T5's tied embedding twice."""
    import comfy.model_management as mm

    t5 = tiny.make_t5()
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    patcher = pack("nodes.comfy.loading").wrap(t5, CPU, CPU)
    emb = t5.shared.weight
    assert patcher.model_size() == mm.module_size(t5) - emb.numel() * emb.element_size()


def test_attention_memory_is_counted_whole_on_the_math_kernel(comfy, monkeypatch):
    """SDPA's math kernel holds every head's score matrix and its softmax, in fp32 (torch upcasts bf16):
    2 x 2 (CFG) x 16 heads x 16384^2 tokens x 4 bytes = 64 GiB at 2K, which a 4x-MLP cap hid. Which kernel runs
    follows the GPU and dtype."""
    from pixart_core import dit_memory

    devices = pack("nodes.comfy.devices")
    math = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.bfloat16, True, fused_attention=False)
    fused = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.bfloat16, True, fused_attention=True)
    scores = 2 * 2 * 16 * 16384 ** 2 * 4
    mlp = 2 * 16384 * 1152 * 12 * 2
    assert math >= scores + (64 << 20)
    assert fused == mlp + (64 << 20)  # a fused kernel's O(tokens) memory stays within the MLP's
    capability = {"major": 7}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability["major"], 5))
    cuda = torch.device("cuda", 0)
    assert not devices.fused_attention(cuda, torch.bfloat16)  # Turing: no bf16 kernel
    assert devices.fused_attention(cuda, torch.float16)
    capability["major"] = 8
    assert devices.fused_attention(cuda, torch.bfloat16)
    assert devices.fused_attention(CPU, torch.bfloat16)
    assert not devices.fused_attention(torch.device("mps"), torch.float16)


# ---- dtype policy ------------------------------------------------------------------------------------------------

# (device, GPU name, compute capability or macOS version, native-bf16 CPU) -> (DiT, T5, VAE) auto dtypes, by hand
# from ComfyUI 0.3.75's rules: its PixArt takes fp16 first (supported_models_base: fp16, bf16, fp32) where
# should_use_fp16 says so, else bf16, else fp32 through unet_manual_cast; should_use_bf16 needs compute
# capability >= 8 (an emulated torch.cuda.is_bf16_supported() does not count) or macOS 14 on MPS.
F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPE_CASES = {
    "H100 (sm90)": ("cuda", "NVIDIA H100 80GB HBM3", (9, 0), None, (F16, B16, B16)),
    "RTX 3090 (sm86)": ("cuda", "NVIDIA GeForce RTX 3090", (8, 6), None, (F16, B16, B16)),
    "RTX 2080 (sm75)": ("cuda", "NVIDIA GeForce RTX 2080", (7, 5), None, (F16, F32, F32)),
    "V100 (sm70)": ("cuda", "Tesla V100-SXM2-16GB", (7, 0), None, (F16, F32, F32)),
    "GTX 1660 (sm75, fp16 broken)": ("cuda", "NVIDIA GeForce GTX 1660", (7, 5), None, (F32, F32, F32)),
    "GTX 1080 (sm61, Linux)": ("cuda", "NVIDIA GeForce GTX 1080", (6, 1), None, (F32, F32, F32)),
    "Mac, macOS 14": ("mps", None, (14, 5), None, (F16, B16, B16)),
    "Mac, macOS 13": ("mps", None, (13, 6), None, (F16, F32, F32)),
    "CPU with AVX512-BF16": ("cpu", None, None, True, (B16, F32, B16)),
    "CPU without native bf16": ("cpu", None, None, False, (F32, F32, F32)),
}


@contextlib.contextmanager
def device_kind(monkeypatch, kind, name, version, native):
    """ComfyUI's and torch's capability queries answering as the device `kind` would."""
    import comfy.model_management as mm

    devices = pack("nodes.comfy.devices")
    if kind == "cuda":
        props = types.SimpleNamespace(major=version[0], minor=version[1], name=name, total_memory=24 * GiB)
        monkeypatch.setattr(mm, "cpu_state", mm.CPUState.GPU)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts here
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: props.total_memory)
        yield torch.device("cuda", 0)
    elif kind == "mps":
        monkeypatch.setattr(mm, "cpu_state", mm.CPUState.MPS)
        monkeypatch.setattr(mm, "mac_version", lambda: version)
        yield torch.device("mps")
    else:
        dtypes = sys.modules[devices.dtypes.__name__]
        monkeypatch.setattr(dtypes, "_cpu_flags", lambda *a: {"avx512f", "avx512bw"} | ({"avx512_bf16"} if native else set()))
        monkeypatch.setattr(dtypes.sys, "platform", "linux")
        dtypes.cpu_native_bf16.cache_clear()
        try:
            yield CPU
        finally:
            dtypes.cpu_native_bf16.cache_clear()


@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_auto_dtype_follows_comfyui_per_device(comfy, monkeypatch, case):
    """The dtype policy: `auto` for each (device kind, capability) pair."""
    kind, name, version, native, (dit, t5, vae) = DTYPE_CASES[case]
    devices = pack("nodes.comfy.devices")
    with device_kind(monkeypatch, kind, name, version, native) as device:
        got = tuple(devices.auto_dtype(k, device) for k in ("dit", "t5", "vae"))
    assert got == (dit, t5, vae), f"{case}: DiT/T5/VAE {got}"
    assert t5 != torch.float16 and vae != torch.float16  # T5-XXL and the SDXL VAE overflow in fp16


def test_auto_dtype_respects_comfyui_flags(comfy, monkeypatch):
    """ComfyUI's own precision flags win over the native-bf16 CPU rule (a user who asked for fp32 gets fp32)."""
    from comfy.cli_args import args

    devices = pack("nodes.comfy.devices")
    with device_kind(monkeypatch, "cpu", None, None, True) as device:
        monkeypatch.setattr(args, "fp32_unet", True)
        monkeypatch.setattr(args, "fp32_vae", True)
        assert devices.auto_dtype("dit", device) == torch.float32
        assert devices.auto_dtype("vae", device) == torch.float32
        monkeypatch.setattr(args, "bf16_text_enc", True)
        assert devices.auto_dtype("t5", device) == torch.bfloat16


# ---- VAE: whole job first, tiles when it still does not fit ------------------------------------------------------

def test_vae_asks_for_the_whole_job_before_deciding_to_tile(comfy):
    """With the DiT still on a 'GPU' that cannot also hold a 1024 px decode, the decision comes after
    ComfyUI evicted what it must for the whole decode: no tiles (the same image whatever else was loaded). When
    even an empty GPU is too small, it tiles."""
    import comfy.model_management as mm

    from pixart_core import vae as cvae

    management, vae_nodes, types_ = pack("nodes.comfy.loading"), pack("nodes.vae_jobs"), pack("nodes.types")
    vae = tiny.make_vae()
    need = cvae.decode_memory((1, 4, 128, 128), torch.float32, vae.config.block_out_channels[0])
    for total, want_tiles in ((need + GiB // 2, False), (need // 4 + GiB, True)):
        dit = management.wrap(torch.nn.Linear(16384, 16384, device="meta"), META, META)  # a 1 GiB stand-in
        handle = types_.VAEHandle(management.wrap(tiny.make_vae(), META, META), "tiny_sdxl_vae.safetensors", "sdxl")
        with fake_gpu(mm.VRAMState.NORMAL_VRAM, total):
            management.use(dit)
            assert mm.get_free_memory(META) < need  # before eviction the decode does not fit
            ready, tiled = vae_nodes.load_for(handle, need, "auto")
            assert tiled == want_tiles
            assert ready.device == META
            assert dit.loaded_size() < GiB, "ComfyUI did not offload the DiT for the decode"
            assert (mm.get_free_memory(META) < need) == want_tiles


ENCODE_OOM_SCRIPT = r"""
import json, sys
from harness.comfyui import Executor, init_comfy, run_capped
from harness.comfyui import error_text as _text

def prompt(tiling, prefix):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 1280, "height": 1280, "batch_size": 1, "color": 0x8844CC}},
            "2": {"class_type": "PixArtSigmaVAELoader", "inputs": {"vae_name": "tiny_sdxl_vae.safetensors", "dtype": "fp32"}},
            "3": {"class_type": "PixArtSigmaVAEEncode", "inputs": {"vae": ["2", 0], "image": ["1", 0], "tiling": tiling}},
            "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": prefix}}}

init_comfy(sys.argv[1])
ex = Executor()
warm = ex.run({k: v for k, v in prompt("auto", "warm").items() if k in ("1", "2")} | {
    "5": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
assert warm["ok"], warm["error"]
# the tiny VAE's tiled encode of 1280x1280 peaks near 850 MiB above the process and the whole encode near
# 950 MiB (measured 2026-11-29): the cap sits between them
never, auto = run_capped(ex, [prompt("never", "enc_never"), prompt("auto", "enc_auto")], headroom_mib=880)
print("RESULT " + json.dumps({"never": {"ok": never["ok"], "text": _text(never)},
                              "auto": {"ok": auto["ok"], "text": _text(auto)}}))
"""


def test_out_of_memory_during_encode_falls_back_to_tiles(comfy_base):
    """A real out-of-memory error in VAE Encode (address space capped 880 MiB above the process, in a
    fresh process): 'never' says what to do, 'auto' retries in tiles and gives the latent."""
    import json
    import subprocess
    from pathlib import Path

    from harness.location import child_env

    r = subprocess.run([sys.executable, "-c", ENCODE_OOM_SCRIPT, str(comfy_base)], env=child_env(Path(__file__).parent),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert not out["never"]["ok"], "the whole-image encode fitted under the cap; the test no longer makes an OOM"
    assert "PixArt VAE encode ran out of memory at 1280x1280" in out["never"]["text"]
    assert "Set tiling to 'auto'" in out["never"]["text"]
    assert out["auto"]["ok"], out["auto"]["text"]
    assert "encode ran out of memory at 1280x1280; retrying in tiles" in r.stderr


@pytest.mark.parametrize("kind", ["dit", "t5", "vae"])
def test_partial_load_gives_the_same_output_as_a_whole_load(comfy, kind):
    """ComfyUI's partial load (ModelPatcher.load with a budget of half the model, the lowvram path)
    streams the layers that do not fit through ComfyUI's cast-weights forward; the output is bit-identical to the
    whole model's."""
    management = pack("nodes.comfy.loading")
    make = {"dit": tiny.make_dit, "t5": tiny.make_t5, "vae": tiny.make_vae}[kind]
    torch.manual_seed(0)
    if kind == "dit":
        inputs = dit_inputs(make(), CPU)
        run = lambda m: m(**inputs)[0]  # noqa: E731
    elif kind == "t5":
        run = lambda m: m(input_ids=torch.tensor([[37, 1782, 3, 9, 1]])).last_hidden_state  # noqa: E731
    else:
        z = torch.randn(1, 4, 8, 8)
        run = lambda m: m.decode(z, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        whole = run(make())
        patcher = management.wrap(make(), CPU, CPU)
        patcher.patch_model(device_to=CPU, lowvram_model_memory=patcher.model_size() // 2)
        try:
            streamed = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
            assert streamed > 0, "nothing was left to stream: not a partial load"
            partial = run(patcher.model.inner)
        finally:
            patcher.unpatch_model(CPU)
    assert torch.equal(whole, partial)


def test_each_model_kind_goes_where_comfyui_puts_its_own(comfy, monkeypatch):
    """The DiT on ComfyUI's torch device / UNet offload device, the T5 on its text-encoder devices (both the CPU
    for device 'cpu', as CLIPLoader's device option does), the VAE on its VAE devices, node outputs on its
    intermediate device; ComfyUI's answers are patched to distinct fake devices so each pairing shows. An unknown
    model kind is refused by name."""
    import comfy.model_management as mm

    devices = pack("nodes.comfy.devices")
    fake = {name: torch.device(f"cuda:{i}") for i, name in enumerate(
        ["get_torch_device", "unet_offload_device", "text_encoder_device", "text_encoder_offload_device",
         "vae_device", "vae_offload_device", "intermediate_device"])}
    for name, dev in fake.items():
        monkeypatch.setattr(mm, name, lambda dev=dev: dev)
    assert devices.dit_devices() == (fake["get_torch_device"], fake["unet_offload_device"])
    assert devices.t5_devices() == (fake["text_encoder_device"], fake["text_encoder_offload_device"])
    assert devices.t5_devices(cpu=True) == (CPU, CPU)
    assert devices.vae_devices() == (fake["vae_device"], fake["vae_offload_device"])
    assert devices.intermediate_device() == fake["intermediate_device"]
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 12345 if dev == CPU else 0)
    assert devices.free_memory(CPU) == 12345
    with pytest.raises(ValueError) as e:
        devices.auto_dtype("controlnet", CPU)
    assert str(e.value) == "unknown model kind 'controlnet'"



def test_fused_attention_reads_the_capability_of_the_models_gpu(comfy, monkeypatch):
    """SDPA's memory-efficient kernel from sm50 in fp16/fp32 (and sm80 for bf16): the capability asked of the GPU the
    model runs on, not the current one (two GPUs: cuda:0 a Maxwell sm50, cuda:1 a Kepler sm37)."""
    devices = pack("nodes.comfy.devices")
    caps = {0: (5, 0), 1: (3, 7)}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: caps[0 if device is None else torch.device(device).index])
    assert devices.fused_attention(torch.device("cuda", 0), torch.float16)
    assert not devices.fused_attention(torch.device("cuda", 0), torch.bfloat16)
    assert not devices.fused_attention(torch.device("cuda", 1), torch.float16)


@pytest.mark.parametrize("family,fmt", [("sdxl", "SDXL"), ("sd", "SD15")])
def test_latent_previews_use_the_latent_space_of_the_models_vae(comfy, monkeypatch, family, fmt):
    """ComfyUI's latent2rgb previewer with the factors of comfy.latent_formats' SDXL (PixArt-Σ) or SD15 (PixArt-α)."""
    import comfy.latent_formats
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    previewer = pack("nodes.comfy.progress")._previewer(family, CPU)
    want = getattr(comfy.latent_formats, fmt)()
    assert isinstance(previewer, latent_preview.Latent2RGBPreviewer)
    assert torch.equal(previewer.latent_rgb_factors, torch.tensor(want.latent_rgb_factors).transpose(0, 1))


def test_fp32_unet_flag_gives_an_fp32_dit_on_a_gpu_too(comfy, monkeypatch):
    """--fp32-unet on an H100, whose own choice would be fp16: ComfyUI's unet_dtype stores fp32, which computes as it
    is (unet_manual_cast gives no cast), so `auto` is fp32 there too."""
    from comfy.cli_args import args

    devices = pack("nodes.comfy.devices")
    kind, name, version, native, _ = DTYPE_CASES["H100 (sm90)"]
    with device_kind(monkeypatch, kind, name, version, native) as device:
        monkeypatch.setattr(args, "fp32_unet", True)
        assert devices.auto_dtype("dit", device) == torch.float32


def test_auto_dtype_asks_about_the_models_own_gpu(comfy, monkeypatch):
    """Two GPUs of different classes (cuda:0 a GTX 1660, sm75 with broken fp16; cuda:1 an H100, sm90): `auto` for a
    model on cuda:1 is the H100's answer (DTYPE_CASES, by hand from ComfyUI's rules), not that of ComfyUI's current
    device."""
    import comfy.model_management as mm

    devices = pack("nodes.comfy.devices")
    props = {0: types.SimpleNamespace(major=7, minor=5, name="NVIDIA GeForce GTX 1660", total_memory=6 * GiB),
             1: types.SimpleNamespace(major=9, minor=0, name="NVIDIA H100 80GB HBM3", total_memory=80 * GiB)}

    def index(device=None) -> int:
        if device is None:
            return 0
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    monkeypatch.setattr(mm, "cpu_state", mm.CPUState.GPU)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props[index(device)])
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: (props[index(device)].major, props[index(device)].minor))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: props[index(dev)].total_memory)
    for i, case in ((1, "H100 (sm90)"), (0, "GTX 1660 (sm75, fp16 broken)")):
        want = DTYPE_CASES[case][4]
        got = tuple(devices.auto_dtype(k, torch.device("cuda", i)) for k in ("dit", "t5", "vae"))
        assert got == want, (case, got)

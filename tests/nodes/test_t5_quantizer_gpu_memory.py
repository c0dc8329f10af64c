"""The T5 Loader quantizing on a GPU into the quantize-once cache, on a fake CUDA GPU (harness.fake_cuda: its
allocations fail with CUDA's out-of-memory error when they pass its size, and ComfyUI's free-memory query reads it).

The quantizer takes one weight at a time to the GPU; before it starts, ComfyUI is asked to free what that takes
(the models it holds there are ComfyUI's to evict), and a GPU that still runs out leaves the work to the CPU.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

CPU = torch.device("cpu")
T5_FILE = "tiny_t5xxl_fp16.safetensors"  # harness.models.write_models: d_model 64, d_ff 128, two blocks
EIGHT_BIT = "8-bit (bitsandbytes)"
# What the quantizer holds on the GPU at once, by hand: its largest 8-bit weight is wi_0 / wi_1 (d_ff 128 rows x
# d_model 64 = 8192 values): their fp16 copy (2 bytes a value), the int8 matrix (1 byte a value) and one fp32 scale
# per row (bitsandbytes' int8_vectorwise_quant).
QUANTIZER_BYTES = 8192 * 2 + 8192 + 128 * 4


def _pack(module: str):
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


@pytest.fixture
def gpu_machine(comfy, comfy_base, monkeypatch, tmp_path):
    """ComfyUI's device queries answering as on a machine with one CUDA GPU (the fake one), a T5 cache folder of
    the test's own (as extra_model_paths.yaml configures one), and a spy on ComfyUI's free_memory that calls it."""
    import comfy.model_management as mm
    import folder_paths

    monkeypatch.setattr(mm, "get_torch_device", lambda: CUDA)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: CUDA)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "pixart_t5_cache", ([str(tmp_path / "cache")], set()))
    asked, real = [], mm.free_memory

    def free_memory(memory_required, device, keep_loaded=()):
        asked.append((memory_required, device))
        return real(memory_required, device, keep_loaded)

    monkeypatch.setattr(mm, "free_memory", free_memory)
    return tmp_path / "cache", asked


def _load(comfy, device: str = "default"):
    loader = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"]
    return loader.execute(t5_name=T5_FILE, quantization=EIGHT_BIT, dtype="fp32", device=device).result[0]


def _quantized_on(cache: Path) -> str | None:
    from pixart_core import t5_cache

    (entry,) = [d for d in cache.iterdir() if d.is_dir()]
    return t5_cache.quantized_on(entry)


def test_the_quantizer_holds_what_it_asks_for(comfy_base):
    """The hand count above is what the quantizer really holds on a GPU: measured on a fake GPU of its own."""
    from pixart_core import t5_quantize, t5_spec

    with FakeCuda(1 << 30) as gpu:
        t5_quantize.quantize_per_tensor(comfy_base / "models" / "text_encoders" / T5_FILE, t5_spec.QUANT_8BIT,
                                        torch.float32, CUDA)
    assert gpu.peak == QUANTIZER_BYTES and gpu.used == 0


def test_comfyui_frees_the_gpu_for_the_quantizer_first(comfy, gpu_machine):
    """A model ComfyUI holds on the GPU leaves the quantizer too little: the loader has ComfyUI free what the
    quantizer takes (ComfyUI unloads that model) and quantizes there."""
    import comfy.model_management as mm

    cache, asked = gpu_machine
    management = _pack("nodes.comfy.loading")
    resident = management.wrap(torch.nn.Linear(128, 128), CUDA, CPU)
    with comfy_sees(FakeCuda(resident.model_size() + QUANTIZER_BYTES // 2)) as gpu:
        mm.load_models_gpu([resident], force_full_load=True)  # whole, as ComfyUI loads a quantized model
        assert resident.loaded_size() > 0 and gpu.free < QUANTIZER_BYTES
        handle = _load(comfy)
        assert (QUANTIZER_BYTES, CUDA) in asked
        assert resident.loaded_size() == 0, "ComfyUI did not unload the model that held the GPU"
    assert _quantized_on(cache) == "cuda:0"
    assert handle.patcher.load_device == CUDA


def test_a_gpu_out_of_memory_while_quantizing_leaves_it_to_the_cpu(comfy, gpu_machine, caplog):
    """Nothing ComfyUI can free makes room: the GPU's out-of-memory error does not fail the loader; the CPU
    quantizes, the log says why, and the cache holds the CPU's result."""
    cache, _ = gpu_machine
    with comfy_sees(FakeCuda(QUANTIZER_BYTES // 2)), caplog.at_level(logging.WARNING):
        handle = _load(comfy)
    assert _quantized_on(cache) == "cpu"
    assert any("ran out of memory quantizing" in r.getMessage() and "on the CPU instead" in r.getMessage()
               for r in caplog.records)
    assert handle.patcher.model_size() > 0


def test_a_t5_on_the_cpu_is_quantized_on_the_gpu(comfy, gpu_machine):
    """T5 device `cpu` on a machine with a GPU: quantized once on the GPU (minutes faster than the CPU for
    T5-XXL), then it runs on the CPU."""
    cache, asked = gpu_machine
    with comfy_sees(FakeCuda(1 << 30)):
        handle = _load(comfy, device="cpu")
    assert _quantized_on(cache) == "cuda:0"
    assert handle.patcher.load_device == CPU and handle.patcher.offload_device == CPU
    assert (QUANTIZER_BYTES, CUDA) in asked


def test_the_quantizer_gpu_is_comfyuis_device_only_when_that_is_cuda(comfy, monkeypatch):
    """ComfyUI started with --cpu (these tests): no GPU to quantize on, so the T5 is quantized on the CPU without
    asking ComfyUI to free memory there; with ComfyUI's device a CUDA GPU, that GPU."""
    import comfy.model_management as mm

    loading = _pack("nodes.comfy.loading")
    assert mm.get_torch_device() == torch.device("cpu")
    assert loading.quantizer_device() is None
    monkeypatch.setattr(mm, "get_torch_device", lambda: CUDA)
    assert loading.quantizer_device() == CUDA

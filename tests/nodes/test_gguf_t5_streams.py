"""A GGUF T5 under ComfyUI's partial loads: its linear layers keep their quantized bytes and dequantize them on the
input's device at each forward, so ComfyUI may leave part of them in system memory and stream them, as it does for
the unquantized T5 (its cast-weights layers)."""
from __future__ import annotations

import sys

import torch

from harness import gguf_files
from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

CPU = torch.device("cpu")
IDS = torch.tensor([[71, 1712, 3, 9, 1263, 16, 8, 4033, 6, 2054, 3, 1]])


def _pack(module: str):
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


def _gguf_t5(tmp_path):
    gguf_t5 = _pack("pixart_core.gguf_t5")  # the pack's classes, as its loader makes them
    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", "Q8_0")
    return lambda: gguf_t5.load(path, torch.float32)


def _streamed(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "comfy_cast_weights", False)]


def test_a_partial_load_streams_gguf_layers_and_gives_the_same_output(comfy, tmp_path):
    """ComfyUI's partial load (ModelPatcher.load with half the model's size, the lowvram path) leaves GGUF layers
    in system memory to stream; the output is bit-identical to the whole model's."""
    GGUFLinear = _pack("pixart_core.gguf_t5").GGUFLinear
    make = _gguf_t5(tmp_path)
    with torch.no_grad():
        whole = make()(input_ids=IDS).last_hidden_state
        patcher = _pack("nodes.comfy.loading").wrap(make(), CPU, CPU)
        patcher.patch_model(device_to=CPU, lowvram_model_memory=patcher.model_size() // 2)
        try:
            model = patcher.model.inner
            streamed = _streamed(model)
            assert any(isinstance(model.get_submodule(n), GGUFLinear) for n in streamed), streamed
            partial = model(input_ids=IDS).last_hidden_state
        finally:
            patcher.unpatch_model(CPU)
    assert torch.equal(whole, partial)


def test_a_gguf_t5_larger_than_the_free_vram_streams_instead_of_failing(comfy, tmp_path):
    """On a GPU with room for about half the GGUF T5 beside ComfyUI's inference reserve (what it keeps free for
    the forward), ComfyUI loads what fits and streams the rest: the reserve stays free, the T5 runs on the GPU and
    encodes as on the CPU. (Loaded whole, a T5-XXL GGUF takes the reserve, or fails to load on a 6 GB card.)"""
    import comfy.model_management as mm

    management = _pack("nodes.comfy.loading")
    make = _gguf_t5(tmp_path)
    with torch.no_grad():
        want = make()(input_ids=IDS).last_hidden_state
    patcher = management.wrap(make(), CUDA, CPU)
    with comfy_sees(FakeCuda(int(mm.minimum_inference_memory()) + patcher.model_size() // 2)) as gpu:
        ready = management.use(patcher)
        assert ready.device == CUDA
        GGUFLinear = _pack("pixart_core.gguf_t5").GGUFLinear
        assert patcher.loaded_size() < patcher.model_size()
        assert any(isinstance(ready.model.get_submodule(n), GGUFLinear) for n in _streamed(ready.model))
        assert gpu.free >= mm.minimum_inference_memory(), "the T5 took ComfyUI's inference reserve"
        with torch.no_grad():
            got = ready.model(input_ids=IDS.to(ready.device)).last_hidden_state.cpu()
    assert torch.equal(got, want)

"""An 8-bit T5 that ComfyUI unloads in part to make room for the DiT, on a fake CUDA GPU (harness.fake_cuda: moves
really copy, and the GPU's memory is what its live tensors hold).

ComfyUI's `free_memory` frees part of a loaded model with `ModelPatcher.partially_unload`, which moves single
layers with `module.to()`, and counts each moved layer's bytes as freed. A layer that keeps a reference to a GPU
tensor outside its parameters (bitsandbytes' `weight.CB` / `weight.SCB`) keeps those bytes on the GPU while
ComfyUI counts them free: the next model then streams or runs out of memory.
"""
from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from conftest import COMFY
from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

CPU = torch.device("cpu")


def _pack(module: str):
    """The pack's module as ComfyUI imported it (from custom_nodes/, under the pack's folder name)."""
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


def test_partial_unload_of_an_8bit_t5_frees_what_comfyui_counts(comfy, tmp_path):
    import bitsandbytes as bnb
    import comfy.model_management as mm

    from pixart_core import t5 as ct5
    from pixart_core import t5_spec
    from pixart_core.quant import all_tensors

    management = _pack("nodes.comfy.loading")
    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    loaded = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
    tok = ct5.load_tokenizer([COMFY / "comfy" / "text_encoders" / "t5_tokenizer"])
    on_cpu = ct5.encode(loaded, tok, "a red fox", 300, CPU)[0]
    t5 = management.wrap(loaded.model, CUDA, CPU)
    dit = management.wrap(tiny.make_dit(), CUDA, CPU)
    # ComfyUI loads the DiT after freeing 1.1 x its size + its minimum inference memory (load_models_gpu). On this
    # GPU it must free half of what the T5 holds beside its embedding: its smallest layers go first (the tied
    # embedding, two modules to ComfyUI, is the largest and stays)
    embedding = loaded.model.shared.weight
    layers = t5.model_size() - embedding.numel() * embedding.element_size()
    total = int(mm.minimum_inference_memory() + 1.1 * dit.model_size()) + t5.model_size() - layers // 2
    with comfy_sees(FakeCuda(total)) as gpu:
        ready = management.use(t5)
        assert ready.device == CUDA and t5.loaded_size() == t5.model_size()
        on_gpu = ct5.encode(loaded, tok, "a red fox", 300, ready.device)[0].cpu()
        management.use(dit)  # load_models_gpu -> free_memory -> the T5's partially_unload
        assert 0 < t5.loaded_size() < t5.model_size(), "ComfyUI did not unload the T5 in part"
        moved = {n: m for n, m in loaded.model.named_modules() if getattr(m, "comfy_patched_weights", None) is False}
        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in moved.values()), "no 8-bit layer was moved"
        left = {n: gpu.bytes_of(t for _, t in all_tensors(m)) for n, m in moved.items()}
        assert not any(left.values()), f"moved to the CPU, still holding GPU bytes: {left}"
        # ComfyUI counts a moved 8-bit layer's state dict as freed, one byte more than it held: its weight_format
        # marker, made when the state dict is read
        markers = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in moved.values())
        counted = sum(p.loaded_size() for p in (t5, dit)) + markers
        assert gpu.used <= counted, f"the GPU holds {gpu.used} bytes, ComfyUI counts {counted}"
        # back on the GPU whole, then back on the CPU: the same embeddings as before the moves
        again = management.use(t5)
        assert torch.equal(ct5.encode(loaded, tok, "a red fox", 300, again.device)[0].cpu(), on_gpu)
        mm.free_memory(gpu.total, CUDA)  # ComfyUI unloads every model from the GPU
        assert gpu.bytes_of(t for _, t in all_tensors(loaded.model)) == 0
    assert torch.equal(ct5.encode(loaded, tok, "a red fox", 300, CPU)[0], on_cpu)
    assert torch.equal(on_gpu, on_cpu)

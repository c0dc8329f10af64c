"""What ComfyUI counts as loaded of our T5 against what the GPU holds, through its whole load, its partial unloads
and its full unload, on a fake CUDA GPU (harness.fake_cuda: the bytes of the live tensors on the GPU).

ComfyUI counts a model's loaded memory module by module (`ModelPatcher._load_list`: each module's own state dict)
when it loads, offloads and partially unloads it. transformers' T5 ties the embedding's weight between two modules
(`shared` and `encoder.embed_tokens`); counted per module, that one tensor is counted twice.
"""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

CPU = torch.device("cpu")


def _pack(module: str):
    """The pack's module as ComfyUI imported it (from custom_nodes/, under the pack's folder name)."""
    return next(m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes." + module))


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_comfyui_counts_what_the_gpu_holds_of_a_t5(comfy, tmp_path, fraction):
    import comfy.model_management as mm

    from pixart_core import t5 as ct5
    from pixart_core import t5_spec

    management = _pack("nodes.comfy.loading")
    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    loaded = ct5.load_t5(path, t5_spec.QUANT_NONE, torch.float32)
    t5 = management.wrap(loaded.model, CUDA, CPU)
    # the T5's distinct bytes, each parameter once (torch's parameters() yields a tied tensor once)
    distinct = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    with comfy_sees(FakeCuda(int(mm.minimum_inference_memory()) + 2 * distinct)) as gpu:  # room for it whole
        management.use(t5)
        assert gpu.used == distinct
        assert t5.loaded_size() == gpu.used
        # the largest modules go first: the embedding, then the layers
        t5.partially_unload(CPU, int(fraction * distinct))
        assert t5.loaded_size() == gpu.used, f"ComfyUI counts {t5.loaded_size()} bytes, the GPU holds {gpu.used}"
        assert t5.loaded_size() >= 0
        # loaded again in part (ComfyUI's lowvram path counts the modules it loads one by one)
        t5.partially_load(CUDA, distinct)
        assert t5.loaded_size() == gpu.used > 0

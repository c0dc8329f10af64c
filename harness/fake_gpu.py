"""A GPU simulated on the CPU with ComfyUI's own model management, for the tests of what a GPU run does.

The fake GPU is the meta device: ComfyUI's loader moves tensors there as it would to CUDA (shapes, no data), with
ComfyUI's free-memory query patched to a fixed budget minus what is loaded there, and `vram_state` set to one of
ComfyUI's modes. Imports ComfyUI only when used (ComfyUI must be initialised first: harness.comfyui.init_comfy).
"""
from __future__ import annotations

import contextlib

import torch

META, CPU = torch.device("meta"), torch.device("cpu")
GiB = 1 << 30


@contextlib.contextmanager
def fake_gpu(state, total: int):
    """ComfyUI in VRAM mode `state` with a meta-device GPU of `total` bytes (free = total - what is loaded there)."""
    import comfy.model_management as mm

    real_free, real_state = mm.get_free_memory, mm.vram_state

    def free(dev=None, torch_free_too=False):
        if dev is None or dev.type != "meta":
            return real_free(dev, torch_free_too)
        used = sum(m.model.loaded_size() for m in mm.current_loaded_models if m.model is not None and m.device == META)
        return (total - used, 0) if torch_free_too else total - used

    mm.get_free_memory, mm.vram_state = free, state
    try:
        yield
    finally:
        mm.get_free_memory, mm.vram_state = real_free, real_state
        # meta tensors cannot move back to the CPU: drop the fake GPU's models from ComfyUI's list as they are
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.device != META]


def budget_for_partial(size: int) -> int:
    """A fake GPU on which ComfyUI's NORMAL/LOW_VRAM loader keeps about half of a `size`-byte model (its formula:
    usable = max(free - minimum required, min(free * ratio, free - minimum inference memory)))."""
    import comfy.model_management as mm

    return int(mm.minimum_inference_memory() + size // 2)

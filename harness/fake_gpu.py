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


def dit_inputs(dit, device) -> dict:
    """The keyword arguments of one CFG-batched DiT forward (fixed random inputs), on `device`."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    emb = torch.randn(2, 5, dit.config.caption_channels)
    t = torch.tensor([999, 999])
    return dict(hidden_states=x.to(device), encoder_hidden_states=emb.to(device), timestep=t.to(device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def placement(model: torch.nn.Module) -> tuple[set, int]:
    """(devices of tensors that are not streamed, how many modules stream their weights per forward)."""
    devices, streamed = set(), 0
    for m in model.modules():
        if getattr(m, "comfy_cast_weights", False):
            streamed += 1
            continue
        devices |= {t.device.type for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    return devices, streamed

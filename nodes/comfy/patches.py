"""Weight patches: LoRA-type adapters read by ComfyUI's LoRA code and applied as ModelPatcher weight patches
(merged on load, restored on unload), and carrying them from our DiT over to a ComfyUI MODEL."""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_patcher


def param_shapes(patcher: comfy.model_patcher.ModelPatcher) -> dict[str, tuple[int, ...]]:
    """Our model's parameter names (as the model itself names them, without the Holder's `inner.`) and shapes."""
    return {k: tuple(v.shape) for k, v in patcher.model.inner.state_dict().items()}


def with_weight_patches(patcher: comfy.model_patcher.ModelPatcher, tensors: dict[str, torch.Tensor],
                        key_map: dict[str, str], strength: float) -> tuple[comfy.model_patcher.ModelPatcher, int, list[str]]:
    """A clone of `patcher` carrying ComfyUI's weight adapters (LoRA, LoHa, LoKr, ...) built by comfy.lora.load_lora
    from `tensors` (module -> parameter in `key_map`), at `strength`: ComfyUI merges them into the weights when it
    loads the clone and restores the originals when it unloads it; the input patcher is not changed.
    Returns (clone, number of parameters patched, modules no adapter could read)."""
    import comfy.lora

    loaded = comfy.lora.load_lora(tensors, {m: "inner." + p for m, p in key_map.items()}, log_missing=False)
    clone = patcher.clone()
    applied = clone.add_patches(loaded, strength)
    unread = sorted(m for m, p in key_map.items()
                    if "inner." + p not in loaded and "inner." + p[: -len(".weight")] + ".bias" not in loaded)
    return clone, len(applied), unread


def carry_weight_patches(src: comfy.model_patcher.ModelPatcher, dst: comfy.model_patcher.ModelPatcher,
                         target: Callable[[str], tuple[str, tuple[int, int, int] | None]]) -> int:
    """Add `src`'s weight patches (one of our models: keys `inner.<parameter>`, each on a whole parameter, as
    with_weight_patches adds them) to `dst` (a ComfyUI MODEL) with the same strengths, at the key and rows
    `target(parameter)` names there. Returns the number of weights patched."""
    done = set()
    for key, entries in src.patches.items():
        name, rows = target(key[len("inner."):])
        k = "diffusion_model." + name if rows is None else ("diffusion_model." + name, rows)
        for strength_patch, patch, strength_model, offset, function in entries:
            if offset is not None or function is not None:  # ComfyUI's patches on rows or through a function
                raise ValueError(f"{key}: a weight patch on part of a weight or through a function cannot be "
                                 "carried over to a ComfyUI MODEL")
            done.update(dst.add_patches({k: patch}, strength_patch, strength_model))
    return len(done)

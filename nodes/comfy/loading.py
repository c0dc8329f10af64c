"""Our models under ComfyUI's model management: ModelPatcher wrapping, whole and partial loading, unloading."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import torch

from ...pixart_core.gguf_t5 import GGUFLinear
from ...pixart_core.logs import logger_name
from ...pixart_core.quant import has_bnb_layers, int8_layers, unique_bytes

log = logging.getLogger(logger_name(__name__))

# Plain torch layers -> ComfyUI's cast-weights classes (the same layers plus a forward that can take its weights
# from another device): with them ComfyUI's partial (lowvram/novram) load keeps part of a model in system memory
# and streams those weights per forward, as it does for its own models.
CAST_OPS = {
    torch.nn.Linear: comfy.ops.disable_weight_init.Linear,
    torch.nn.Conv2d: comfy.ops.disable_weight_init.Conv2d,
    torch.nn.Embedding: comfy.ops.disable_weight_init.Embedding,
    torch.nn.LayerNorm: comfy.ops.disable_weight_init.LayerNorm,
    torch.nn.GroupNorm: comfy.ops.disable_weight_init.GroupNorm,
}


class Holder(torch.nn.Module):
    """ModelPatcher writes `.device` and bookkeeping attributes onto the module it manages; diffusers and
    transformers models have a read-only `.device`, so they ride inside this plain container.

    `streamable`: built from ComfyUI's cast-weights layers (and GGUF layers, which stream by themselves), so it may
    be partially loaded. bitsandbytes-quantized models are not (their layers have no cast path): ComfyUI loads them
    whole, and unloads them whole or layer by layer (their 8-bit layers move their int8 matrices and scales
    themselves: pixart_core.int8_linear).
    """

    def __init__(self, inner: torch.nn.Module, streamable: bool = False):
        super().__init__()
        self.inner = inner
        self.streamable = streamable
        self.after_move: Callable[[], None] | None = None  # called after each whole move (the bridge's sharing)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.after_move is not None:
            self.after_move()
        return self


def castable(model: torch.nn.Module) -> torch.nn.Module:
    """Turn the model's plain torch layers into ComfyUI's cast-weights layers, in place (same parameters, same math),
    and mark GGUF layers as such: their forward already dequantizes on the input's device, wherever their
    quantized bytes are, so ComfyUI may leave them in system memory."""
    for m in model.modules():
        cls = CAST_OPS.get(type(m))
        if cls is not None:
            m.__class__ = cls
            if not hasattr(m, "bias"):
                m.bias = None  # ComfyUI's Embedding sets this at construction; its cast path reads it
        elif isinstance(m, GGUFLinear):  # the attributes ComfyUI's loader reads and sets on cast-weights layers
            m.comfy_cast_weights, m.weight_function, m.bias_function = False, [], []
    return model


def wrap(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for one of our models, sized by its distinct tensors (ComfyUI's state-dict count would take a
    tied embedding twice). Models without bitsandbytes layers get cast-weights layers, so ComfyUI can load them
    partially."""
    streamable = not has_bnb_layers(model)
    if streamable:
        castable(model)
    return comfy.model_patcher.ModelPatcher(Holder(model, streamable), load_device=load_device,
                                            offload_device=offload_device, size=unique_bytes(model))


def wrap_comfy_model(model: torch.nn.Module, load_device: torch.device,
                     offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for a comfy.model_base model (a ComfyUI MODEL), as ComfyUI's own loaders make it."""
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def unload(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Have ComfyUI unload the model (any of its clones) when loaded: its weights are then its own, unpatched, on
    the offload device."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.is_clone(patcher):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


@dataclasses.dataclass
class Loaded:
    """A model ready to run, and the device to run it on (inputs go there)."""

    model: torch.nn.Module
    device: torch.device


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _place_rest(model: torch.nn.Module, device: torch.device) -> None:
    """After a partial load: move what ComfyUI's loader does not place to the load device, i.e. the tensors of
    modules without cast-weights layers (norm weights, parameters of non-leaf modules such as PixArt's
    scale_shift_table, buffers such as its position embedding). They are small; streamed layers stay put."""
    for m in model.modules():
        if getattr(m, "comfy_cast_weights", False):
            continue  # weights stream to the device at each forward
        tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        if any(not _on(t, device) for _, t in tensors):
            m._apply(lambda t: t.to(device), recurse=False)


def use(patcher: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> Loaded:
    """Have ComfyUI put the model on its load device (evicting others, or loading it partially when it does not
    fit: the rest streams from system memory per forward) and return it with the device to run it on.

    A bitsandbytes-quantized model is loaded whole. In ComfyUI's --novram mode, which loads nothing whole, it stays
    in system memory and runs on the CPU: bitsandbytes layers cannot stream.
    """
    holder = patcher.model
    try:
        mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=not holder.streamable)
    except Exception as e:
        if holder.streamable or not is_oom(e):
            raise
        smaller = "Choose '4-bit nf4' (smaller), or" if any(True for _ in int8_layers(holder)) else "Choose"
        raise type(e)(
            f"The quantized {type(holder.inner).__name__} ({patcher.model_size() / 2**30:.2f} GiB) does not fit in "
            f"the free memory of {patcher.load_device} and cannot be loaded in parts (bitsandbytes layers do not "
            f"stream). {smaller} quantization 'none' or a GGUF file (ComfyUI then streams what does not fit), or "
            "device 'cpu', or free memory.") from e
    device = patcher.load_device
    if holder.streamable:
        _place_rest(holder.inner, device)
    elif not all(_on(t, device) for t in holder.inner.parameters()):
        device = patcher.offload_device
        holder.to(device)
        log.warning("PixArt: %s is quantized and ComfyUI's memory mode (%s) does not load it whole: it runs on %s.",
                    type(holder.inner).__name__, mm.vram_state.name, device)
    return Loaded(holder.inner, device)


def use_together(patchers: list[comfy.model_patcher.ModelPatcher], memory_required: int = 0) -> list[Loaded]:
    """Have ComfyUI load several models for one job in one call, as its samplers load a model with its ControlNets
    (load_models_gpu([model, *controlnets], memory_required=...)): it frees memory for all of them at once, then
    loads each whole or in part (the rest streams per forward). Returns them ready, in the order given."""
    for p in patchers:
        assert p.model.streamable, "use_together takes models with cast-weights layers (never quantized ones)"
    mm.load_models_gpu(list(patchers), memory_required=memory_required)
    out = []
    for p in patchers:
        _place_rest(p.model.inner, p.load_device)
        out.append(Loaded(p.model.inner, p.load_device))
    return out


def use_clip(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Load a ComfyUI CLIP's patcher as ComfyUI's own text encode does (`CLIP.load_model`): ComfyUI decides what
    is evicted and what part is loaded, and applies the CLIP's patches (LoRA)."""
    mm.load_model_gpu(patcher)


def quantizer_device() -> torch.device | None:
    """The GPU bitsandbytes quantizes on: ComfyUI's torch device where that is a CUDA GPU (also for a T5 that runs
    on the CPU: it is quantized once, into the cache), else None."""
    device = mm.get_torch_device()
    return device if device.type == "cuda" else None


def make_room(device: torch.device) -> Callable[[int], None]:
    """A callable that has ComfyUI free `bytes` on `device` for work outside its models (it unloads models, whole
    or in part, until that much is free), as its loaders do before loading a model."""
    def free(nbytes: int) -> None:
        mm.free_memory(nbytes, device)
    return free


def is_oom(error: BaseException) -> bool:
    """A device out-of-memory error (ComfyUI's OOM_EXCEPTION is plain Exception on CPU-only torch builds)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(error).lower()
    return (oom is not None and isinstance(error, oom)) or "out of memory" in text or "can't allocate memory" in text

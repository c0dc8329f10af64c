"""The one place that talks to ComfyUI's model management: ModelPatcher wrapping, loading, dtype decisions,
progress, interrupt."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
from comfy.cli_args import args

from ..pixart_core import dtypes
from ..pixart_core.gguf_t5 import has_gguf_layers
from ..pixart_core.quant import move_quantized_state, unique_bytes

log = logging.getLogger(__name__)

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

    `streamable`: built from ComfyUI's cast-weights layers, so it may be partially loaded. bitsandbytes-quantized
    models are not (their layers have no cast path): ComfyUI loads them whole.
    """

    def __init__(self, inner: torch.nn.Module, streamable: bool = False):
        super().__init__()
        self.inner = inner
        self.streamable = streamable

    def to(self, *args, **kwargs):
        """ComfyUI loads and offloads with .to(); quantized T5 layers need their side tensors moved too."""
        super().to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            move_quantized_state(self, device)
        return self


def _quantized(model: torch.nn.Module) -> bool:
    """bitsandbytes layers, or a GGUF T5's layers (quantized blocks dequantized per forward): loaded whole."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()) or has_gguf_layers(model)


def castable(model: torch.nn.Module) -> torch.nn.Module:
    """Turn the model's plain torch layers into ComfyUI's cast-weights layers, in place (same parameters, same math)."""
    for m in model.modules():
        cls = CAST_OPS.get(type(m))
        if cls is not None:
            m.__class__ = cls
            if not hasattr(m, "bias"):
                m.bias = None  # ComfyUI's Embedding sets this at construction; its cast path reads it
    return model


def wrap(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for one of our models, sized by its distinct tensors (ComfyUI's state-dict count would take a
    tied embedding twice). Unquantized models get cast-weights layers, so ComfyUI can load them partially."""
    streamable = not _quantized(model)
    if streamable:
        castable(model)
    return comfy.model_patcher.ModelPatcher(Holder(model, streamable), load_device=load_device,
                                            offload_device=offload_device, size=unique_bytes(model))


def wrap_comfy_model(model: torch.nn.Module, load_device: torch.device,
                     offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for a comfy.model_base model (a ComfyUI MODEL), as ComfyUI's own loaders make it."""
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def carry_weight_patches(src: comfy.model_patcher.ModelPatcher, dst: comfy.model_patcher.ModelPatcher,
                         target: Callable[[str], tuple[str, tuple[int, int, int] | None]]) -> int:
    """Add `src`'s weight patches (one of our models: keys `inner.<parameter>`) to `dst` (a ComfyUI MODEL) with the
    same strengths, at the key and rows `target(parameter)` names there. Returns the number of weights patched."""
    done = set()
    for key, entries in src.patches.items():
        name, base = target(key[len("inner."):])
        for strength_patch, patch, strength_model, offset, function in entries:
            rows = base
            if offset is not None:  # a patch on rows of a parameter: the same rows inside the target's
                if rows is not None and (offset[0] != 0 or offset[1] + offset[2] > rows[2]):
                    raise ValueError(f"{key}: a weight patch on rows {offset} cannot be carried over")
                rows = offset if rows is None else (0, rows[1] + offset[1], offset[2])
            k = "diffusion_model." + name
            k = k if rows is None and function is None else (k, rows) if function is None else (k, rows, function)
            done.update(dst.add_patches({k: patch}, strength_patch, strength_model))
    return len(done)


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

    A quantized model is loaded whole. In ComfyUI's --novram mode, which loads nothing whole, it stays in system
    memory and runs on the CPU: bitsandbytes layers cannot stream.
    """
    holder = patcher.model
    try:
        mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=not holder.streamable)
    except Exception as e:
        if holder.streamable or not is_oom(e):
            raise
        raise type(e)(
            f"The quantized {type(holder.inner).__name__} ({patcher.model_size() / 2**30:.2f} GiB) does not fit in "
            f"the free memory of {patcher.load_device} and cannot be loaded in parts (bitsandbytes layers do not "
            "stream). Choose '4-bit nf4' (smaller), or quantization 'none' (ComfyUI then streams what does not fit), "
            "or free memory.") from e
    device = patcher.load_device
    if holder.streamable:
        _place_rest(holder.inner, device)
    elif not all(_on(t, device) for t in holder.inner.parameters()):
        device = patcher.offload_device
        holder.to(device)  # with the 8-bit layers' side tensors
        log.warning("PixArt: %s is quantized and ComfyUI's memory mode (%s) does not load it whole: it runs on %s.",
                    type(holder.inner).__name__, mm.vram_state.name, device)
    return Loaded(holder.inner, device)


def use_clip(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Load a ComfyUI CLIP's patcher as ComfyUI's own text encode does (`CLIP.load_model`): ComfyUI decides what
    is evicted and what part is loaded, and applies the CLIP's patches (LoRA)."""
    mm.load_model_gpu(patcher)


def auto_dtype(kind: str, device: torch.device) -> torch.dtype:
    """What dtype "auto" means for a model of `kind` ("dit", "t5", "vae") on `device`.

    GPUs and MPS: what ComfyUI picks for its own models of that kind (its PixArt for the DiT, with its manual-cast
    compute dtype where weights would be stored in a dtype the device cannot compute; its VAE rules with the SDXL
    VAE's working dtypes; the text-encoder flags for T5, else bf16 where ComfyUI would use bf16, never fp16).
    CPUs: fp32, except bf16 for the DiT and VAE on CPUs with native bf16 (AVX512-BF16, AMX), unless ComfyUI was
    told fp32 (--force-fp32, --fp32-unet, --fp32-vae).
    """
    import comfy.supported_models

    if kind == "dit":
        supported = comfy.supported_models.PixArtSigma.supported_inference_dtypes
        stored = mm.unet_dtype(device=device, supported_dtypes=supported)
        chosen = mm.unet_manual_cast(stored, device, supported) or stored
        forced_fp32 = args.fp32_unet
    elif kind == "vae":
        chosen = mm.vae_dtype(device=device, allowed_dtypes=[torch.bfloat16, torch.float32])
        forced_fp32 = args.fp32_vae
    elif kind == "t5":
        if args.fp32_text_enc:
            return torch.float32
        if args.bf16_text_enc:
            return torch.bfloat16
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    if (mm.is_device_cpu(device) and chosen == torch.float32 and not forced_fp32 and not args.force_fp32
            and dtypes.cpu_native_bf16()):
        return torch.bfloat16
    return chosen


def fused_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's SDPA has a memory-efficient kernel here (else it falls back to its math kernel, which
    materialises the whole attention matrix): CPUs (flash kernel), CUDA from sm80 in any dtype, and CUDA sm50+ in
    fp16/fp32 (memory-efficient kernel; it has no bf16 before sm80). MPS is counted as the math kernel."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8 or (major >= 5 and dtype != torch.bfloat16)
    return False


def dit_devices() -> tuple[torch.device, torch.device]:
    return mm.get_torch_device(), mm.unet_offload_device()


def t5_devices(cpu: bool = False) -> tuple[torch.device, torch.device]:
    """(load, offload) device of the T5: ComfyUI's text-encoder devices, or the CPU for both (as ComfyUI's
    CLIPLoader does for device "cpu": model management then never puts it on, or frees, a GPU for it)."""
    if cpu:
        return torch.device("cpu"), torch.device("cpu")
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def vae_devices() -> tuple[torch.device, torch.device]:
    return mm.vae_device(), mm.vae_offload_device()


def intermediate_device() -> torch.device:
    """Where node outputs (conditioning, latents) live between nodes."""
    return mm.intermediate_device()


def step_callback(total: int, vae_family: str,
                  device: torch.device) -> Callable[[int, int, Callable[[], torch.Tensor]], None]:
    """Per-step hook for the sampling loop: ComfyUI progress bar with a latent preview (ComfyUI's previewer for
    the SDXL or SD latent space), then raise if the user pressed Cancel."""
    import comfy.latent_formats
    import latent_preview

    bar = comfy.utils.ProgressBar(total)
    fmt = comfy.latent_formats.SDXL() if vae_family == "sdxl" else comfy.latent_formats.SD15()
    previewer = latent_preview.get_previewer(device, fmt)

    def on_step(step: int, steps: int, x0: Callable[[], torch.Tensor]) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", x0()) if previewer is not None else None
        bar.update_absolute(step, steps, preview)
        mm.throw_exception_if_processing_interrupted()

    return on_step


def free_memory(device: torch.device) -> int:
    return mm.get_free_memory(device)


def is_oom(error: BaseException) -> bool:
    """A device out-of-memory error (ComfyUI's OOM_EXCEPTION is plain Exception on CPU-only torch builds)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(error).lower()
    return (oom is not None and isinstance(error, oom)) or "out of memory" in text or "can't allocate memory" in text


def soft_empty_cache() -> None:
    mm.soft_empty_cache()


def progress_callback(total: int) -> Callable[[int, int], None]:
    """ComfyUI progress bar, then raise if the user pressed Cancel (between images, tiles, ...)."""
    bar = comfy.utils.ProgressBar(total)

    def on_progress(done: int, of: int) -> None:
        bar.update_absolute(done, of)
        mm.throw_exception_if_processing_interrupted()

    return on_progress


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


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


def tiled_step_callbacks(steps: int, tiles: int, vae_family: str, device: torch.device
                         ) -> tuple[Callable[[int, int, Callable[[], torch.Tensor]], None], Callable[[int, int], None]]:
    """Per-step and per-tile hooks for a tiled sample: one ComfyUI progress bar of steps x tiles that moves after
    every tile (then raises if the user pressed Cancel), with a latent preview of the whole canvas after each step."""
    import comfy.latent_formats
    import latent_preview

    total = steps * tiles
    bar = comfy.utils.ProgressBar(total)
    fmt = comfy.latent_formats.SDXL() if vae_family == "sdxl" else comfy.latent_formats.SD15()
    previewer = latent_preview.get_previewer(device, fmt)
    done = [0]

    def on_tile(tile: int, of: int) -> None:
        done[0] += 1
        bar.update_absolute(min(done[0], total), total)
        mm.throw_exception_if_processing_interrupted()

    def on_step(step: int, of: int, x0: Callable[[], torch.Tensor]) -> None:
        if previewer is not None:
            bar.update_absolute(min(done[0], total), total, previewer.decode_latent_to_preview_image("JPEG", x0()))
        mm.throw_exception_if_processing_interrupted()

    return on_step, on_tile

"""The one place that talks to ComfyUI's model management: ModelPatcher wrapping, loading, progress, interrupt."""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..pixart_core.quant import move_quantized_state


class Holder(torch.nn.Module):
    """ModelPatcher writes `.device` and bookkeeping attributes onto the module it manages; diffusers and
    transformers models have a read-only `.device`, so they ride inside this plain container."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def to(self, *args, **kwargs):
        """ComfyUI loads and offloads with .to(); quantized T5 layers need their side tensors moved too."""
        super().to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            move_quantized_state(self, device)
        return self


def wrap(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for one of our models (sized from its state dict, as ComfyUI sizes its own)."""
    return comfy.model_patcher.ModelPatcher(Holder(model), load_device=load_device, offload_device=offload_device)


def use(patcher: comfy.model_patcher.ModelPatcher, memory_required: int = 0) -> torch.nn.Module:
    """Have ComfyUI put the model on its load device (evicting others as needed) and return the inner model.

    Loaded whole: our modules have no ComfyUI cast-weights ops, so a partial (lowvram) load would split them
    across devices.
    """
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    return patcher.model.inner


def dit_devices() -> tuple[torch.device, torch.device]:
    return mm.get_torch_device(), mm.unet_offload_device()


def t5_devices() -> tuple[torch.device, torch.device]:
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

"""Progress, latent previews and Cancel: ComfyUI's progress bar and previewer behind plain callables that the
core's loops call."""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management as mm
import comfy.utils


def _previewer(vae_family: str, device: torch.device):
    """ComfyUI's latent previewer (as set by --preview-method) for the SDXL or SD latent space, or None."""
    import comfy.latent_formats
    import latent_preview

    fmt = comfy.latent_formats.SDXL() if vae_family == "sdxl" else comfy.latent_formats.SD15()
    return latent_preview.get_previewer(device, fmt)


def step_callback(total: int, vae_family: str,
                  device: torch.device) -> Callable[[int, int, Callable[[], torch.Tensor]], None]:
    """Per-step hook for the sampling loop: ComfyUI progress bar with a latent preview (ComfyUI's previewer for
    the SDXL or SD latent space), then raise if the user pressed Cancel."""
    bar = comfy.utils.ProgressBar(total)
    previewer = _previewer(vae_family, device)

    def on_step(step: int, steps: int, x0: Callable[[], torch.Tensor]) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", x0()) if previewer is not None else None
        bar.update_absolute(step, steps, preview)
        mm.throw_exception_if_processing_interrupted()

    return on_step


def tiled_step_callbacks(steps: int, tiles: int, vae_family: str, device: torch.device
                         ) -> tuple[Callable[[int, int, Callable[[], torch.Tensor]], None], Callable[[int, int], None]]:
    """Per-step and per-tile hooks for a tiled sample: one ComfyUI progress bar of steps x tiles that moves after
    every tile (then raises if the user pressed Cancel), with a latent preview of the whole canvas after each step."""
    total = steps * tiles
    bar = comfy.utils.ProgressBar(total)
    previewer = _previewer(vae_family, device)
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


def progress_callback(total: int) -> Callable[[int, int], None]:
    """ComfyUI progress bar, then raise if the user pressed Cancel (between images, tiles, ...)."""
    bar = comfy.utils.ProgressBar(total)

    def on_progress(done: int, of: int) -> None:
        bar.update_absolute(done, of)
        mm.throw_exception_if_processing_interrupted()

    return on_progress


def check_interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()

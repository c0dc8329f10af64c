"""A VAE job (decode or encode) under ComfyUI's model management: load the VAE for the whole job's memory, tile
when it still does not fit, and retry in tiles after an out-of-memory error. Shared by the VAE and hires nodes."""
from __future__ import annotations

import logging
import traceback

from .comfy import devices, loading
from .types import VAEHandle
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))


def load_for(vae: VAEHandle, need: int, tiling: str) -> tuple[loading.Loaded, bool]:
    """Load the VAE asking ComfyUI for the whole job's memory first (it evicts other models for it, as its own VAE
    nodes do), then decide: tile only when the job still does not fit (or when told to)."""
    ready = loading.use(vae.patcher, memory_required=need)
    return ready, tiling == "always" or (tiling == "auto" and need > devices.free_memory(ready.device))


def run_tiled(job, tiled: bool, tiling: str, what: str, size: str):
    """`job(tiled)`; on an out-of-memory error without tiles, again in tiles (unless tiling is 'never'); one in tiles
    says what to do."""
    if not tiled:
        try:
            return job(False)
        except Exception as e:
            _freed_if_oom(e)
            if tiling == "never":
                raise _oom(e, f"PixArt VAE {what} ran out of memory at {size}. Set tiling to 'auto' ({what}s in "
                              "tiles when memory runs short) or 'always'.") from e
            log.warning("PixArt VAE %s ran out of memory at %s; retrying in tiles.", what, size)
        devices.soft_empty_cache()  # retried outside the except block, so the failed attempt's tensors are freed first
    try:
        return job(True)
    except Exception as e:
        _freed_if_oom(e)
        raise _oom(e, f"PixArt VAE {what} ran out of memory at {size} even in tiles. Free memory (close other "
                      f"programs, or unload models from ComfyUI's menu) or {what} a smaller image.") from e


def _freed_if_oom(error: Exception) -> None:
    """Re-raise an error that is not out-of-memory; free the failed attempt's tensors of one that is: its frames hold
    them, and ComfyUI keeps the error it reports in a reference cycle that only the garbage collector breaks, seconds
    later (on a GPU, that is VRAM)."""
    if not loading.is_oom(error):
        raise error
    traceback.clear_frames(error.__traceback__)


def _oom(error: Exception, message: str) -> Exception:
    """The same kind of out-of-memory error (ComfyUI's executor treats OOM specially), with our message."""
    try:
        return type(error)(message)
    except Exception:
        return RuntimeError(message)

"""Recorders for the tests of what the pack asks of ComfyUI and diffusers: each wraps the real function, records
its arguments and calls it, so the call still does what it does. Also the VAE those tests use."""
from __future__ import annotations

import torch

# An encoder whose first width (32) is neither its second (64) nor the released VAE's 128: a memory estimate scaled
# by the wrong width, or not scaled, shows.
WIDE_FIRST_CHANNELS = [32, 64, 64, 64]


def wide_first_vae(dtype: torch.dtype = torch.float32):
    """diffusers' AutoencoderKL at the tiny preset with WIDE_FIRST_CHANNELS, random weights (seed 0)."""
    from diffusers import AutoencoderKL

    from . import models as tiny

    torch.manual_seed(0)
    return AutoencoderKL(**{**tiny.vae_config(), "block_out_channels": WIDE_FIRST_CHANNELS}).to(dtype).eval()


def record_loads(mm, monkeypatch) -> list[tuple[list[str], int]]:
    """ComfyUI's model_management.load_models_gpu, recording (the class names of the models' inner modules,
    memory_required) per call, then loading."""
    calls, real = [], mm.load_models_gpu

    def recording(models, memory_required=0, **kwargs):
        calls.append((sorted(type(m.model.inner).__name__ for m in models), memory_required))
        return real(models, memory_required=memory_required, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", recording)
    return calls


def record_calls(obj, method: str) -> list[tuple[int, ...]]:
    """The shape of the first argument of each later call of `obj.method` (an instance attribute wrapping the bound
    method, e.g. a diffusers VAE's _tiled_encode or tiled_decode); the method still runs."""
    calls, real = [], getattr(obj, method)

    def recording(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    setattr(obj, method, recording)
    return calls


def record_previewers(monkeypatch) -> list:
    """ComfyUI's latent_preview.get_previewer, recording the device each call is given, then making the previewer."""
    import latent_preview

    devices, real = [], latent_preview.get_previewer

    def recording(device, latent_format):
        devices.append(device)
        return real(device, latent_format)

    monkeypatch.setattr(latent_preview, "get_previewer", recording)
    return devices

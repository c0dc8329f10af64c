"""Device and dtype policy: where ComfyUI runs and keeps each kind of model, what "auto" dtype means there, and
what memory is free."""
from __future__ import annotations

import torch

import comfy.model_management as mm
from comfy.cli_args import args

from ...pixart_core import dtypes


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


def free_memory(device: torch.device) -> int:
    return mm.get_free_memory(device)


def soft_empty_cache() -> None:
    mm.soft_empty_cache()

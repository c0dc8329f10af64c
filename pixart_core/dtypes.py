"""The loaders' dtype choices: one policy for "auto" and for the named dtypes.

What "auto" means on a device is decided by the caller (nodes/comfy/devices.py asks ComfyUI, as it decides for its
own models); this module applies the user's choice and the rules that hold whatever the device: T5-XXL and the
SDXL VAE never compute in fp16 (they overflow).
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import torch
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

NAMED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick(choice: str, auto: torch.dtype, what: str, choices: tuple[str, ...], fp16_ok: bool = True) -> torch.dtype:
    """The dtype for a loader's `choice` (one of `choices`); `auto` is what "auto" resolves to on the load device.

    Where fp16 overflows (`fp16_ok` False), an fp16 `auto` (e.g. ComfyUI started with --fp16-vae) becomes fp32.
    """
    if choice not in choices:
        raise ValueError(f"{what} dtype {choice!r} is not one of {choices}.")
    if choice != "auto":
        return NAMED[choice]
    if auto == torch.float16 and not fp16_ok:
        log.warning("%s: fp16 overflows in this model; computing in fp32 instead.", what)
        return torch.float32
    return auto


# CPU feature flags (Linux /proc/cpuinfo) that mean bf16 matmuls run natively: x86 AVX512-BF16 or AMX-BF16, ARM BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or None where the OS does not list them."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (then ~3.6x faster than fp32; emulated, several times slower).

    oneDNN (torch's mkldnn) must support bf16 here, and where the OS lists CPU flags one of them must say native
    bf16: oneDNN alone also answers yes on AVX512 CPUs that only emulate it.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    flags = _cpu_flags() if sys.platform.startswith("linux") else None
    return flags is not None and bool(flags & NATIVE_BF16_FLAGS)

"""The loaders' dtype choices: one policy for "auto" and for the named dtypes."""
from __future__ import annotations

import torch

NAMED = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick(choice: str, device: torch.device, what: str, choices: tuple[str, ...],
         gpu_without_bf16: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype for a loader's `choice` (one of `choices`). "auto": bf16 on GPUs that have it, else
    `gpu_without_bf16` on a GPU and fp32 on the CPU (bf16 matmuls are ~5x slower than fp32 on CPUs)."""
    if choice not in choices:
        raise ValueError(f"{what} dtype {choice!r} is not one of {choices}.")
    if choice != "auto":
        return NAMED[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else gpu_without_bf16
    return torch.float32

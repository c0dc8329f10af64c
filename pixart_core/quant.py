"""Moving bitsandbytes-quantized modules between devices completely.

bitsandbytes keeps an 8-bit layer's int8 matrix and scales outside the module's parameters (`weight.CB/SCB`
before the first forward, `state.CB/SCB` after it). `nn.Module.to()` on a parent module moves only the
parameters, so those tensors would stay on the old device (pinning VRAM that ComfyUI believes it freed) and
the next forward would mix devices. `move_quantized_state` moves them along; 4-bit layers keep their
quantization state on the parameter, which moves with it.
"""
from __future__ import annotations

from typing import Iterator

import torch


def _int8_layers(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return
    yield from (m for m in module.modules() if isinstance(m, Linear8bitLt))


def move_quantized_state(module: torch.nn.Module, device: torch.device) -> None:
    """After `module` was moved to `device`, move every 8-bit layer's out-of-parameter tensors there too."""
    for layer in _int8_layers(module):
        data = layer.weight.data  # already on `device`; holds the same int8 matrix as CB
        for holder in (layer.weight, layer.state):
            cb = getattr(holder, "CB", None)
            if cb is not None and cb.device != device:
                holder.CB = data if (data.dtype == cb.dtype and data.shape == cb.shape) else cb.to(device)
            scb = getattr(holder, "SCB", None)
            if scb is not None and scb.device != device:
                holder.SCB = scb.to(device)


def all_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters, buffers and bitsandbytes' side tensors (int8 matrices, scales, 4-bit quant state)."""
    yield from module.named_parameters()
    yield from module.named_buffers()
    for name, m in module.named_modules():
        for holder, label in ((getattr(m, "weight", None), "weight"), (getattr(m, "state", None), "state")):
            for attr in ("CB", "SCB"):
                t = getattr(holder, attr, None) if holder is not None else None
                if isinstance(t, torch.Tensor):
                    yield f"{name}.{label}.{attr}", t
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            for attr in ("absmax", "code"):
                t = getattr(qs, attr, None)
                if isinstance(t, torch.Tensor):
                    yield f"{name}.weight.quant_state.{attr}", t

"""Moving bitsandbytes-quantized modules between devices completely, with one copy of each int8 matrix.

bitsandbytes keeps an 8-bit layer's int8 matrix and scales outside the module's parameters (`weight.CB/SCB`
before the first forward, `state.CB/SCB` after it, where `state.CB` shares `weight.data`). Two ways a move goes
wrong: `nn.Module.to()` on a parent module moves only the parameters, so `state.CB/SCB` stay on the old device
(pinning VRAM that ComfyUI believes it freed); and `Linear8bitLt.to()` (what ComfyUI calls on each leaf) moves
`weight` and `state.CB` into two separate new tensors, doubling the int8 memory on the new device.
`single_int8_copy` prevents the second by putting every layer back in its before-the-first-forward form after
each forward (the int8 matrix and scales on the weight, which bitsandbytes moves as one); `move_quantized_state`
handles the first. 4-bit layers keep their quantization state on the parameter, which moves with it.

Nothing here imports bitsandbytes: a model can only hold its layers once something imported it, so the checks look
at what is already imported (importing bitsandbytes logs a kernels warning on CPU machines, at every ComfyUI start
that imports it).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

import torch


def has_bnb_layers(model: torch.nn.Module) -> bool:
    """Whether the model holds bitsandbytes layers (8-bit or 4-bit; told by the layer's module, no import)."""
    return any(type(m).__module__.split(".")[0] == "bitsandbytes" for m in model.modules())


def _int8_layers(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # not imported: no model can hold its layers
    if bnb_nn is None:
        return
    yield from (m for m in module.modules() if isinstance(m, bnb_nn.Linear8bitLt))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def move_quantized_state(module: torch.nn.Module, device: torch.device) -> None:
    """After `module` was moved to `device`, move every 8-bit layer's out-of-parameter tensors there too, and make
    every int8 matrix share the weight's storage again (one copy, wherever it ended up)."""
    for layer in _int8_layers(module):
        data = layer.weight.data  # already on `device`; holds the same int8 matrix as CB
        for holder in (layer.weight, layer.state):
            cb = getattr(holder, "CB", None)
            if cb is not None and not _same_storage(cb, data):
                holder.CB = data if (data.dtype == cb.dtype and data.shape == cb.shape) else cb.to(device)
            scb = getattr(holder, "SCB", None)
            if scb is not None and scb.device != device:
                holder.SCB = scb.to(device)


def _rearm(layer: torch.nn.Module, inputs, output) -> None:
    """Forward hook: the layer back in its before-the-first-forward form (int8 matrix and scales on the weight,
    none in `state`), so that a later `.to()` moves one int8 copy, not two. The next forward re-reads them."""
    state = layer.state
    if state.CB is not None and layer.weight.CB is None:
        layer.weight.CB, layer.weight.SCB = layer.weight.data, state.SCB
        state.CB = state.SCB = None


def single_int8_copy(module: torch.nn.Module) -> int:
    """Keep every 8-bit layer of `module` movable as one int8 copy (see the module docstring); returns how many."""
    layers = list(_int8_layers(module))
    for layer in layers:
        if not getattr(layer, "_pixart_rearm", False):
            layer.register_forward_hook(_rearm)
            layer._pixart_rearm = True
    return len(layers)


def int8_copies(module: torch.nn.Module) -> list[int]:
    """Per 8-bit layer, how many distinct storages hold its int8 matrix (weight.data, weight.CB, state.CB): 1 is right."""
    counts = []
    for layer in _int8_layers(module):
        tensors = [layer.weight.data] + [t for t in (getattr(layer.weight, "CB", None), layer.state.CB)
                                         if isinstance(t, torch.Tensor)]
        counts.append(len({t.untyped_storage()._cdata for t in tensors}))
    return counts


def unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (a tied T5 embedding is one tensor,
    though the state dict names it twice)."""
    seen: dict[tuple, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.dtype)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


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


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@contextlib.contextmanager
def quiet_int8_casts() -> Iterator[None]:
    """Silence bitsandbytes' per-matmul notice that 8-bit layers cast their inputs to fp16 (one console line per
    layer per forward: ~288 per T5-XXL prompt). The cast is how LLM.int8() works, not a problem to report.
    bitsandbytes 0.50 logs it; 0.48 and 0.49 raise it as a UserWarning."""
    logger, notice = logging.getLogger("bitsandbytes.autograd._functions"), _DropCastNotice()
    logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
            yield
    finally:
        logger.removeFilter(notice)

"""bitsandbytes-quantized modules: telling them apart, keeping 8-bit layers movable, their sizes, their tensors.

bitsandbytes keeps an 8-bit layer's int8 matrix and scales outside the module's parameters (`weight.CB/SCB`
before the first forward, `state.CB/SCB` after it, where `state.CB` shares `weight.data`), so a plain `.to()` of
the layer leaves them on the old device (or, for `state.CB`, makes a second copy). `single_int8_copy` swaps in
pixart_core.int8_linear's layer, which moves them with the weight on every path (`.to()` of the model, of one
layer as ComfyUI's partial unload does, or `_apply`). 4-bit layers keep their quantization state on the parameter,
whose `.to()` moves it in place.

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
    """Whether the model holds bitsandbytes layers (8-bit or 4-bit, or ours built on them; no import)."""
    return any(c.__module__.split(".")[0] == "bitsandbytes" for m in model.modules() for c in type(m).__mro__)


def int8_layers(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module's bitsandbytes 8-bit layers (none when bitsandbytes was never imported)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # not imported: no model can hold its layers
    if bnb_nn is None:
        return
    yield from (m for m in module.modules() if isinstance(m, bnb_nn.Linear8bitLt))


def single_int8_copy(module: torch.nn.Module) -> int:
    """Make every 8-bit layer of `module` move as one int8 copy, its scales with it, whoever moves it
    (pixart_core.int8_linear.Linear8bitLt swapped in: the same layer and tensors); returns how many."""
    layers = list(int8_layers(module))
    if layers:
        from .int8_linear import Linear8bitLt

        for layer in layers:
            layer.__class__ = Linear8bitLt
    return len(layers)


def int8_copies(module: torch.nn.Module) -> list[int]:
    """Per 8-bit layer, how many distinct storages hold its int8 matrix (weight.data, weight.CB, state.CB): 1 is right."""
    counts = []
    for layer in int8_layers(module):
        tensors = [layer.weight.data] + [t for t in (getattr(layer.weight, "CB", None), layer.state.CB)
                                         if isinstance(t, torch.Tensor)]
        counts.append(len({t.untyped_storage()._cdata for t in tensors}))
    return counts


def unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's tensors (parameters, buffers and bitsandbytes' scales and 4-bit quantization state),
    each counted once (a tied T5 embedding is one tensor, though the state dict names it twice; an 8-bit layer's
    int8 matrix is its weight)."""
    seen: dict[tuple, int] = {}
    for _, t in all_tensors(module):
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.dtype)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def _quant_state_tensors(qs, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A 4-bit quantization state's tensors: absmax and code (quant_map), and the nested state's (double
    quantization: offset, state2.absmax, state2.code)."""
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            yield f"{prefix}.{attr}", t
    nested = getattr(qs, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested, prefix + ".state2")


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
            yield from _quant_state_tensors(qs, f"{name}.weight.quant_state")


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

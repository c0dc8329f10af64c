"""bitsandbytes' 8-bit Linear layer, moving its int8 matrix and scales with its weight whoever moves it.

bitsandbytes keeps the int8 matrix and its scales as attributes of the weight (`weight.CB` / `weight.SCB`, before the
first forward) or of the layer's `state` (after it; `state.CB` then shares `weight.data`). torch's `Module._apply`,
which every `.to()` runs, gives the weight its moved data in place (`param.data = moved`) and keeps the Parameter
object, so those attributes would keep pointing at the tensors on the old device: after ComfyUI moved a layer off
the GPU (`ModelPatcher.partially_unload` moves single layers with `module.to()`) the int8 matrix and scales stayed
in VRAM that ComfyUI counted as freed. This layer points them at the moved data after every `_apply`.

After each forward it also goes back to its before-the-first-forward form (matrix and scales on the weight, none in
`state`): `Linear8bitLt.to()` otherwise moves `weight` and `state.CB` into two separate copies.

Imported only where a model already holds bitsandbytes layers (importing bitsandbytes logs a kernels warning on CPU
machines): pixart_core.quant swaps this class in.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch


def _follow(t: torch.Tensor | None, data: torch.Tensor) -> torch.Tensor | None:
    """`t` (an int8 matrix or its scales) where `data` is now: the int8 matrix is `data` itself."""
    if t is None:
        return None
    if t.dtype == data.dtype and t.shape == data.shape:
        return data
    return t if t.device == data.device else t.to(data.device)


class Linear8bitLt(bnb.nn.Linear8bitLt):
    """bitsandbytes' Linear8bitLt whose int8 matrix and scales follow its weight (see the module docstring)."""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        data = self.weight.data
        for holder in (self.weight, self.state):
            holder.CB, holder.SCB = _follow(holder.CB, data), _follow(holder.SCB, data)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        state = self.state
        if state.CB is not None and self.weight.CB is None:  # the next forward re-reads them from the weight
            self.weight.CB, self.weight.SCB = self.weight.data, state.SCB
            state.CB = state.SCB = None
        return out

"""Building modules without allocating or initializing their weights (filled later from a state dict)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters are created on the meta device; buffers stay real (PixArt's non-persistent pos_embed is computed)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def assign_state_dict(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load every parameter (and persistent buffer) of `module` from `sd` by assignment, strictly."""
    module.load_state_dict(sd, strict=True, assign=True)
    leftover = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    assert not leftover, f"parameters left on meta: {leftover[:3]}"

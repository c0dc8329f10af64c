"""A module that stands in for a PixArt DiT in the sampling loop (ControlNets, tiles) and reads through to it."""

from __future__ import annotations

from torch import nn


class DiTView(nn.Module):
    """Looks like the DiT it wraps to the sampling loop: `config`, `use_additional_conditions` and any other
    attribute or submodule the loop reads come from `self.dit`; subclasses give the forward."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    @property
    def config(self):
        return self.dit.config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            dit = self.__dict__["_modules"].get("dit")
            if dit is None:
                raise
            return getattr(dit, name)

    @property
    def use_additional_conditions(self) -> bool:
        return bool(getattr(self.dit, "use_additional_conditions", False))

"""ComfyUI glue: the node classes of the pack (V3 schema) and its extension object."""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .bridge import ConditioningToComfy, DiTToModel
from .controlnet import ControlNetApply, ControlNetLoader
from .dit import DiTLoader
from .hires import HiresUpscale, TiledRefine
from .lora import LoraLoader
from .resolution import Resolution
from .sampler import Sampler, SamplerAdvanced
from .text import T5Loader, TextEncode
from .vae import VAEDecode, VAEEncode, VAELoader

NODES: list[type[io.ComfyNode]] = [T5Loader, TextEncode, DiTLoader, Sampler, SamplerAdvanced, Resolution, VAELoader,
                                  VAEDecode, VAEEncode, DiTToModel, ConditioningToComfy, HiresUpscale, TiledRefine,
                                  LoraLoader, ControlNetLoader, ControlNetApply]


class PixArtExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES

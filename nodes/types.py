"""Socket types of the pack and the handles that travel on them."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..pixart_core.variants import Variant

T5 = io.Custom("PIXART_T5")
DiT = io.Custom("PIXART_DIT")
ConditioningType = io.Custom("PIXART_CONDITIONING")  # the socket; pixart_core.conditioning.Conditioning travels on it
VAE = io.Custom("PIXART_VAE")
ControlNet = io.Custom("PIXART_CONTROLNET")

CATEGORY = "PixArt-Σ"


@dataclasses.dataclass
class T5Handle:
    patcher: Any  # comfy ModelPatcher around a transformers T5EncoderModel
    tokenizer: Any
    dtype: torch.dtype
    name: str
    quantization: str
    identity: tuple  # file, its mtime/size and the load settings: what the embedding cache is keyed by


@dataclasses.dataclass
class VAEHandle:
    patcher: Any  # comfy ModelPatcher around a diffusers AutoencoderKL
    name: str
    family: str | None  # "sdxl" / "sd" when the name or config says; None when unknown


@dataclasses.dataclass
class ControlNetHandle:
    patcher: Any  # comfy ModelPatcher around a pixart_core.controlnet.ControlNetAdapter
    name: str
    base: Variant | None  # the DiT variant the file says it was trained with (the authors' checkpoints say)
    layout: str  # what the file was, in words


@dataclasses.dataclass
class AppliedControl:
    """One PixArt-Σ ControlNet Apply: the ControlNet, its control image and the VAE that encodes it, how strongly and
    over which part of the schedule ([start, end) as fractions) it acts."""

    controlnet: ControlNetHandle
    image: torch.Tensor  # IMAGE [B, H, W, 3] in 0..1
    vae: VAEHandle
    strength: float
    start: float
    end: float
    # hint latents by latent size (h, w), encoded when a generation of that size first needs them (a few sizes)
    hints: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DiTHandle:
    patcher: Any  # comfy ModelPatcher around a diffusers PixArtTransformer2DModel
    variant: Variant
    name: str
    detected: str  # how the variant was decided, shown to the user
    controls: tuple[AppliedControl, ...] = ()  # ControlNets applied (PixArt-Σ ControlNet Apply), in order


LATENT_SPACE_KEY = "pixart_latent_space"  # our LATENT dicts say which VAE family made/needs them

"""PixArt model variants: a frozen dataclass, named presets, and detection from names and configs."""
from __future__ import annotations

import dataclasses
import re
from typing import Any


@dataclasses.dataclass(frozen=True)
class Variant:
    """What the weights of one released PixArt checkpoint need around them."""

    name: str
    family: str  # "sigma" | "alpha"
    resolution: int  # 256 / 512 / 1024 / 2048: the trained resolution family
    sample_size: int  # latent side length of the trained resolution
    interpolation_scale: float  # position-embedding interpolation (pe_interpolation)
    micro_conditioning: bool  # resolution + aspect-ratio embedders (alpha-1024-MS only)
    max_tokens: int  # T5 token limit: sigma 300, alpha 120
    vae: str  # "sdxl" | "sd"

    @property
    def vae_scaling_factor(self) -> float:
        return VAE_SCALING[self.vae]


VAE_SCALING = {"sdxl": 0.13025, "sd": 0.18215}

PRESETS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("sigma-256", "sigma", 256, 32, 0.5, False, 300, "sdxl"),
        Variant("sigma-512", "sigma", 512, 64, 1.0, False, 300, "sdxl"),
        Variant("sigma-1024", "sigma", 1024, 128, 2.0, False, 300, "sdxl"),
        Variant("sigma-2k", "sigma", 2048, 256, 4.0, False, 300, "sdxl"),
        Variant("alpha-256", "alpha", 256, 32, 1.0, False, 120, "sd"),
        Variant("alpha-512", "alpha", 512, 64, 1.0, False, 120, "sd"),
        Variant("alpha-1024", "alpha", 1024, 128, 2.0, True, 120, "sd"),
    ]
}
DEFAULT_VARIANT = "sigma-1024"


def variant_from_name(name: str) -> Variant | None:
    """The preset a file or folder name points at ("PixArt-Sigma-XL-2-2K-MS" -> sigma-2k), or None."""
    low = name.lower().replace("_", "-")
    family = "alpha" if ("alpha" in low or re.search(r"pixart-xl-2", low)) and "sigma" not in low else None
    if "sigma" in low:
        family = "sigma"
    if family is None:
        return None
    res = None
    if re.search(r"(^|[^0-9])2k|2048", low):
        res = 2048
    else:
        for r in (1024, 512, 256):
            if re.search(rf"(^|[^0-9]){r}([^0-9]|$)", low):
                res = r
                break
    if res is None:
        return None
    key = f"{family}-{'2k' if res == 2048 else res}"
    return PRESETS.get(key)


def variant_from_config(config: dict[str, Any], name: str = "") -> Variant:
    """Complete a diffusers transformer config with what its name tells (alpha/sigma)."""
    sample_size = int(config.get("sample_size", 128))
    by_name = variant_from_name(name)
    family = by_name.family if by_name else "sigma"
    micro = config.get("use_additional_conditions")
    if micro is None:  # diffusers' own default
        micro = sample_size == 128
    if micro:  # only alpha-1024-MS has the micro-conditioning embedders
        family = "alpha"
    for v in PRESETS.values():
        if v.family == family and v.sample_size == sample_size:
            return v
    raise ValueError(
        f"{name or 'config'}: sample_size {sample_size} matches no PixArt variant "
        f"(expected one of 32, 64, 128, 256)."
    )

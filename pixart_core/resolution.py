"""Trained aspect-ratio bins (diffusers' ASPECT_RATIO_*_BIN: keys are H/W, values [H, W]) and resize-back."""
from __future__ import annotations

import torch

FAMILIES = (256, 512, 1024, 2048)
MAX_SIDE = 4096  # the largest side of any trained bin (2K family)
MULTIPLE = 16  # patch 2 x VAE 8


def _check_multiple(label: str, v: int, where: str, hint: str) -> None:
    if v % MULTIPLE:
        lo, hi = max(MULTIPLE, v // MULTIPLE * MULTIPLE), v // MULTIPLE * MULTIPLE + MULTIPLE
        raise ValueError(f"{where}: {label} {v} is not a multiple of {MULTIPLE} (patch 2 x VAE 8); use {lo} or {hi}."
                         f"{hint}")


def check_multiple(width: int, height: int, where: str, hint: str = "") -> None:
    """Refuse sides that are not multiples of 16 (patch 2 x VAE 8), naming the neighbouring multiples; `where`
    starts the message, `hint` ends it."""
    for label, v in (("width", width), ("height", height)):
        _check_multiple(label, v, where, hint)


def check_size(width: int, height: int) -> None:
    """Refuse sizes the DiT cannot take before anything is allocated, naming valid neighbours."""
    for label, v in (("width", width), ("height", height)):
        if v <= 0 or v > MAX_SIDE:
            raise ValueError(f"PixArt sampler: {label} {v} is outside {MULTIPLE}..{MAX_SIDE}.")
        _check_multiple(label, v, "PixArt sampler", "")


def optional_size(width: int, height: int, where: str, names: str, unset: str = "0") -> tuple[int, int] | None:
    """A size given as two widgets where 0 means not set: None when neither is set; refuses one without the other
    (`names` the two widgets, `unset` what leaving them at 0 gives)."""
    if (width > 0) != (height > 0):
        raise ValueError(f"{where}: set both {names}, or neither ({unset}).")
    return (width, height) if width > 0 else None


def bins(family: int) -> dict[str, list[float]]:
    """diffusers' bin table for a resolution family (the reference, imported rather than copied)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    table = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
             2048: ASPECT_RATIO_2048_BIN}
    if family not in table:
        raise ValueError(f"No aspect-ratio bins for a {family}px family; choose one of {FAMILIES}.")
    return table[family]


def snap(width: int, height: int, family: int) -> tuple[int, int]:
    """The trained bin nearest in aspect ratio to width x height: (bin width, bin height)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"Requested size {width}x{height} must be positive.")
    ratio = height / width
    key = min(bins(family), key=lambda r: abs(float(r) - ratio))
    h, w = bins(family)[key]
    return int(w), int(h)


def resize_and_crop(images: torch.Tensor, width: int, height: int, mode: str = "bilinear",
                    covering: bool = False) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,height,width]: scaled to cover, then centre-cropped (the aspect ratio kept).

    The scaled sides are truncated with int() as diffusers' PixArtImageProcessor.resize_and_crop_tensor does (the
    resize-back after decoding matches diffusers' resolution binning); with `covering` they are rounded and never
    below the target (the hires upscale: a ratio whose float product lands just under a side cannot leave it one
    pixel short). The two rules give different sizes for some inputs, so both are kept, and with them the pixels.
    """
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    if covering:
        rh, rw = max(height, round(h * ratio)), max(width, round(w * ratio))
    else:
        rh, rw = int(h * ratio), int(w * ratio)
    kwargs = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
    images = torch.nn.functional.interpolate(images, size=(rh, rw), mode=mode, **kwargs)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top:top + height, left:left + width]

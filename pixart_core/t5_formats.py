"""ComfyUI's "scaled fp8" T5 files (t5xxl_fp8_e4m3fn_scaled.safetensors): fp8 weights with per-tensor scales.

The layout, as ComfyUI reads it (comfy/text_encoders/sd3_clip.py `t5_xxl_detect`, comfy/sd1_clip.py, comfy/ops.py
`scaled_fp8_ops`): a marker tensor `scaled_fp8` (empty; its dtype is the weights' fp8 type), and for every Linear
layer an fp8 `X.weight` with a float32 scalar `X.scale_weight`; the real weight is `weight.float() * scale_weight`
(`convert_weight`), the inverse of how the file was made (`set_weight`: `weight / scale_weight`, rounded to fp8).
`X.scale_input` (for fp8 matmuls) does not change the weight and is ignored. Other tensors (embedding, norms,
relative attention bias) are stored as they are, and ComfyUI casts them without a scale.

Loading goes through transformers' own loader (so bf16/fp32 and the bitsandbytes 8-bit/nf4 quantization work as
for any other file) with a state dict of lazy tensors: each weight is dequantized from the memory-mapped file only
when the loader reaches it, so the whole model is never in memory twice.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

from . import files, quant
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

MARKER = "scaled_fp8"
SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# T5 weights that are not Linear layers (ComfyUI's scaled ops give these no scale)
_UNSCALED = ("shared.weight", "embed_tokens.weight", "relative_attention_bias.weight", "layer_norm.weight")


def scaled_keys(keys) -> set[str]:
    """The marker and scale keys of a scaled-fp8 file (empty for any other file)."""
    return {k for k in keys if k == MARKER or k.endswith(("." + MARKER, SCALE, INPUT_SCALE))}


class LazyTensor:
    """A tensor transformers' loader materializes when it reaches it (it reads `t[...]`, as from a safetensors slice)."""

    def __init__(self, read: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype):
        self._read, self.shape, self.dtype = read, torch.Size(shape), dtype

    def __getitem__(self, index) -> torch.Tensor:
        return self._read()[index]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> torch.dtype:
        return self.dtype


def _dequantizer(f, key: str, scale_key: str | None) -> Callable[[], torch.Tensor]:
    if scale_key is None:
        return lambda: f.get_tensor(key)
    return lambda: f.get_tensor(key).to(torch.float32) * f.get_tensor(scale_key).to(torch.float32)


def lazy_state_dict(f, name: str, prefix: str) -> dict[str, LazyTensor]:
    """The dequantizing state dict of an open safetensors handle `f` (keys without `prefix`, markers and scales
    dropped), or a clear error when an fp8 Linear weight has no scale."""
    keys = set(f.keys())
    out: dict[str, LazyTensor] = {}
    missing = []
    for key in sorted(keys - scaled_keys(keys)):
        if not key.startswith(prefix):
            continue
        sl = f.get_slice(key)
        shape = tuple(sl.get_shape())
        dtype = files._ST_DTYPES.get(sl.get_dtype())
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        scale_key = base + SCALE if base is not None and base + SCALE in keys else None
        if scale_key is None and dtype in FP8 and len(shape) == 2 and not key.endswith(_UNSCALED):
            missing.append(key)
        out[key[len(prefix):]] = LazyTensor(_dequantizer(f, key, scale_key), shape,
                                            torch.float32 if scale_key else dtype)
    if missing:
        raise files.WeightFileError(
            f"{name}: a scaled fp8 file whose per-tensor scales are missing for {len(missing)} weight(s) "
            f"(e.g. {missing[0][: -len('.weight')]}{SCALE}); without them the weights are wrong by a factor per tensor. The file is "
            "incomplete or was converted badly: download t5xxl_fp8_e4m3fn_scaled.safetensors again, or use "
            "t5xxl_fp16.safetensors."
        )
    for key in sorted(k for k in keys if k.endswith(SCALE)):
        t = f.get_tensor(key)
        if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t) <= 0:
            raise files.WeightFileError(
                f"{name}: {key} should be one positive finite number (a per-tensor scale) but is "
                f"{list(t.shape)} {t.flatten()[:2].tolist()}. The file is corrupt: download it again."
            )
    return out


def load_scaled_fp8(path: Path, prefix: str, config, dtype: torch.dtype, qconfig) -> torch.nn.Module:
    """A transformers T5EncoderModel from a scaled fp8 file: dequantized tensor by tensor, then cast to `dtype`
    or quantized by bitsandbytes (`qconfig`), on the CPU."""
    from safetensors import safe_open
    from transformers import T5EncoderModel

    with contextlib.ExitStack() as stack:
        f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        sd = lazy_state_dict(f, path.name, prefix)
        model = T5EncoderModel.from_pretrained(
            None, config=config, state_dict=sd, dtype=dtype, quantization_config=qconfig,
            device_map={"": "cpu"} if qconfig is not None else None,
        )
    # (keys and shapes were checked against the model before: pixart_core.t5.load_t5)
    quant.single_int8_copy(model)
    log.info("%s: scaled fp8 T5 dequantized with its per-tensor scales", path.name)
    return model.eval().requires_grad_(False)

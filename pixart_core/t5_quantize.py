"""Quantizing a T5 one tensor at a time on a device (a GPU), into bitsandbytes' serialization.

transformers' bitsandbytes loader quantizes on the CPU when the model is to stay there (ComfyUI decides when the
T5 goes to the GPU), which takes minutes for T5-XXL. Here each weight goes to the device alone, is quantized by the
bitsandbytes function transformers' loader calls, and comes back at once: the result has the keys and bytes of
transformers' quantized model, so t5_cache stores it and transformers loads it as a pre-quantized model.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import files, t5_spec
from .meta import empty_weights


class UnsupportedSource(ValueError):
    """A source the per-tensor quantizer does not read (then the model is quantized by transformers' loader)."""


def source_tensors(path: Path) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple[int, ...]]]:
    """Where each tensor of a plain safetensors T5 lives: {model key: (file, key in file)} and the shapes."""
    wfiles = [path] if path.is_file() else sorted(f for f in t5_spec.weights_folder(path).iterdir()
                                                   if f.suffix.lower() in files.SAFETENSORS_EXT)
    if not wfiles or any(f.suffix.lower() not in files.SAFETENSORS_EXT for f in wfiles):
        raise UnsupportedSource(f"{path.name} is not a safetensors T5")
    where, shapes = {}, {}
    for f in wfiles:
        for k, s in files.read_shapes(f).items():
            where[k], shapes[k] = (f, k), s
    if any(k.endswith((".scale_weight", "scaled_fp8")) for k in where):
        raise UnsupportedSource(f"{path.name} holds scaled fp8 weights")
    prefix = t5_spec.encoder_prefix(where)
    if prefix is None:
        raise UnsupportedSource(f"{path.name}: no T5 encoder keys")
    return t5_spec.model_keys(where, prefix), t5_spec.model_keys(shapes, prefix)


def quantize_weight(key: str, w: torch.Tensor, kind: str, device: torch.device) -> dict[str, torch.Tensor]:
    """One Linear weight quantized on `device` as bitsandbytes' parameter classes do when transformers loads them
    (Int8Params._quantize: int8 rows + SCB scales; Params4bit._quantize: nf4, block 64, no double quantization),
    returned on the CPU under the state-dict names bitsandbytes serializes them with. `kind`: t5_spec.QUANT_8BIT
    or QUANT_NF4."""
    import bitsandbytes.functional as bnbf

    base = key[: -len(".weight")]
    if kind == t5_spec.QUANT_8BIT:
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(device=device, dtype=torch.float16))
        return {key: cb.cpu(), base + ".SCB": scb.cpu(), base + ".weight_format": torch.tensor(0, dtype=torch.uint8)}
    q, state = bnbf.quantize_4bit(w.to(device).contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4",
                                  quant_storage=torch.uint8)
    out = {key: q.cpu()}
    state.to("cpu")
    out.update({f"{key}.{name}": t.cpu() for name, t in state.as_dict(packed=True).items()})
    return out


def device_bytes(path: str | os.PathLike, quantization: str, dtype: torch.dtype) -> int:
    """The most device memory quantize_per_tensor holds at once: the largest quantized weight's copy on the device
    and what quantizing it makes there. 8-bit: the fp16 copy (2 bytes a value), the int8 matrix (1) and one fp32
    scale per row; nf4: the copy in `dtype`, the packed matrix (half a byte a value), one fp32 absmax per 64
    values and the 16-value fp32 code. Each result goes back to the CPU before the next weight comes."""
    path = Path(path)
    _, shapes = source_tensors(path)
    config = t5_spec.config_from_shapes(shapes, path.name)
    _, kinds = _quantized_skeleton(config, t5_spec.bnb_config(quantization, dtype))
    most = 0
    for key, kind in kinds.items():
        rows, n = shapes[key][0], math.prod(shapes[key])
        if kind == t5_spec.QUANT_8BIT:
            held = n * 2 + n + rows * 4
        else:
            held = n * dtype.itemsize + (n + 1) // 2 + -(-n // 64) * 4 + 16 * 4
        most = max(most, held)
    return most


def quantize_per_tensor(path: str | os.PathLike, quantization: str, dtype: torch.dtype, device: torch.device):
    """(state dict, config) of the quantized T5, made one tensor at a time: each weight that transformers would
    quantize goes to `device`, is quantized there by the bitsandbytes function transformers' loader calls, and
    comes back to the CPU at once; the rest is converted to `dtype`. Device memory holds one tensor at a time
    (never the whole model); host memory holds the quantized result and one source tensor.

    The tensors are bitsandbytes' serialization of the model transformers builds (the same keys and bytes as
    `load_t5(...).model.state_dict()`, for device=cpu), so the cache loads them as a pre-quantized model.
    """
    from safetensors import safe_open

    path = Path(path)
    where, shapes = source_tensors(path)
    config = t5_spec.config_from_shapes(shapes, path.name)
    qconfig = t5_spec.bnb_config(quantization, dtype)
    expected, kinds = _quantized_skeleton(config, qconfig)
    files.check_keys(path.name, where, expected, "a T5-v1.1 encoder")
    out: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    try:
        for key in sorted(where):
            f, k = where[key]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt", device="cpu").__enter__()
            src = handles[f].get_tensor(k)
            if tuple(src.shape) != expected[key]:
                raise files.WeightFileError(f"{path.name}: {key} is {list(src.shape)}, expected {list(expected[key])}.")
            w = src.to(dtype)  # transformers' loader converts to the model's dtype before quantizing
            if key in kinds:
                out.update(quantize_weight(key, w, kinds[key], device))
            else:
                out[key] = w if w.data_ptr() != src.data_ptr() else w.clone()
            del src, w
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    config.quantization_config = qconfig
    return out, config


def _quantized_skeleton(config, qconfig) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The shapes of the model transformers builds for this config (the embedding once, as `shared.weight`), and
    the mode of each weight its bitsandbytes quantizer replaces with a quantized layer."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from transformers import T5EncoderModel
    from transformers.quantizers import AutoHfQuantizer

    with empty_weights():
        skeleton = T5EncoderModel(config)
    AutoHfQuantizer.from_config(qconfig, pre_quantized=False).preprocess_model(skeleton, device_map={"": "cpu"})
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != t5_spec.EMBEDDING_ALIAS}
    kinds = {name + ".weight": t5_spec.QUANT_8BIT if isinstance(m, Linear8bitLt) else t5_spec.QUANT_NF4
             for name, m in skeleton.named_modules() if isinstance(m, (Linear8bitLt, Linear4bit))}
    return expected, kinds

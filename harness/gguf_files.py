"""GGUF T5 encoder files as llama.cpp's converter writes them (the layout of city96/t5-v1_1-xxl-encoder-gguf),
made from a transformers T5EncoderModel with gguf's own writer and name map.

Tensor names come from gguf-py's `TensorNameMap` for MODEL_ARCH.T5ENCODER (what convert_hf_to_gguf.py uses);
Q8_0, Q4_0, Q5_0 and BF16 blocks from gguf-py's quantizers; Q4_K, Q5_K and Q6_K blocks (gguf-py only reads those)
from the small quantizers below, which pack ggml's block layouts (ggml-common.h block_q4_K / block_q5_K /
block_q6_K) with a plain min/max or abs-max scale per sub-block. The `_M` mixes follow llama.cpp's rule of thumb:
ffn_down in Q6_K, the rest in the named K type. Rows whose length is not a multiple of the type's block size, norms
and the relative attention bias stay F32/F16, as converters keep them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import models

QK_K = 256
# A T5 whose every linear row is a multiple of 256 values, so every GGUF type (K-quants: 256-value blocks) applies.
GGUF_WIDTH_CONFIG = dict(models.T5_CONFIG, d_model=256, d_ff=512, num_heads=4, d_kv=64)
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] into ggml's 12-byte layout (the inverse of get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _k_affine(blocks: np.ndarray, levels: int):
    """Per 32-value sub-block: q in 0..levels with x ~ d*sc*q - dmin*m (Q4_K: 15 levels, Q5_K: 31)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    hi = sub.max(axis=-1)
    scale, mins = (hi - lo) / levels, -lo
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = mins.max(axis=-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16), 0).clip(0, 63)
        m = np.where(dmin16 > 0, np.rint(mins / dmin16), 0).clip(0, 63)
        step = (d16 * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin16 * m)[..., None]) / step), 0).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _nibble_pack(q: np.ndarray, n: int, group: int) -> np.ndarray:
    """Values [n, 2k*group] (0..15): pairs of `group`-long runs share bytes, the first in the low nibbles."""
    q = q.reshape(n, -1, 2, group)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, m, q = _k_affine(blocks, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(sc, m),
                           _nibble_pack(q.reshape(n, -1), n, 32)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, m, q = _k_affine(blocks, 31)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):  # bit j of byte l: the high bit of sub-block j's value l
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(sc, m), qh,
                           _nibble_pack((q & 0x0F).reshape(n, -1), n, 32)], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = scale.max(axis=-1, keepdims=True) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16), 0).clip(-128, 127)
        step = (d16 * sc)[..., None]
        q = np.where(step > 0, np.rint(sub / step), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(n, 256).astype(np.uint8)
    low, high = q & 0x0F, q >> 4
    ql = _nibble_pack(low, n, 64)  # per 128-value half: values t and 64+t share byte t
    h = high.reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def quantize(values: np.ndarray, qtype_name: str) -> tuple[np.ndarray, object]:
    """(data for GGUFWriter.add_tensor, its GGMLQuantizationType) of a float32 array in one GGUF type."""
    import gguf

    T = gguf.GGMLQuantizationType
    qtype = T[qtype_name]
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F32:
        return values, qtype
    if qtype == T.F16:
        return values.astype(np.float16), qtype
    own = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}
    if qtype in own:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = values.reshape(-1, values.shape[-1])
        data = own[qtype](rows.reshape(-1, block)).reshape(rows.shape[0], -1)
        assert data.shape[1] == values.shape[-1] // block * size
        return data.reshape(*values.shape[:-1], -1), qtype
    return gguf.quants.quantize(values, qtype), qtype


def tensor_type(hf_key: str, shape: tuple[int, ...], file_type: str) -> str:
    """The GGUF type a tensor gets in a file of `file_type` (e.g. Q4_K_M)."""
    import gguf

    if len(shape) < 2 or "relative_attention_bias" in hf_key:
        return "F32" if len(shape) < 2 else "F16"
    if file_type.endswith("_M"):
        file_type = "Q6_K" if hf_key.endswith("DenseReluDense.wo.weight") else file_type[:-2]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[file_type]][0]
    return file_type if shape[-1] % block == 0 else "F16"


def write_t5_gguf(model_or_sd, path: Path, file_type: str = "Q8_0", arch: str = "t5encoder",
                  shapes: dict[str, tuple[int, ...]] | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF T5 encoder file of a T5EncoderModel (or its state dict): `file_type` one of TYPES; `arch` the
    general.architecture written; `shapes` overrides the shape a tensor is written with (a broken file); `extra`
    more tensors by GGUF name (e.g. a full T5's decoder, `dec.blk.0.attn_q.weight`), written as F32."""
    import gguf
    import torch

    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    n_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_blocks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny T5-v1.1 encoder")
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        name = names.get_name(key, try_suffixes=(".weight",))
        assert name is not None, key
        values = value.detach().to(torch.float32).numpy()
        if shapes and key in shapes:
            values = np.resize(values, shapes[key]).astype(np.float32)
        data, qtype = quantize(values, tensor_type(key, values.shape, file_type))
        writer.add_tensor(name, data, raw_dtype=qtype)
    for name, values in (extra or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path

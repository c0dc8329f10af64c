"""GGUF T5 encoder files as llama.cpp's converter and llama-quantize write them (the layout of
city96/t5-v1_1-xxl-encoder-gguf), made from a transformers T5EncoderModel with gguf's own writer and name map.

Tensor names come from gguf-py's `TensorNameMap` for MODEL_ARCH.T5ENCODER (what convert_hf_to_gguf.py uses);
Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 and BF16 blocks from gguf-py's quantizers; Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, IQ4_XS and
IQ4_NL blocks (gguf-py only reads those) from the small quantizers below, which pack ggml's block layouts
(ggml-common.h block_q2_K ... block_q6_K, block_iq4_nl/xs) with a plain min/max or abs-max scale per
sub-block: valid blocks, not llama.cpp's error-minimising search. Which tensor gets which type follows
llama-quantize's recipes (`tensor_type`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import models

QK_K = 256
# A T5 whose every linear row is a multiple of 256 values, so every GGUF type (K-quants: 256-value blocks) applies.
GGUF_WIDTH_CONFIG = dict(models.T5_CONFIG, d_model=256, d_ff=512, num_heads=4, d_kv=64)
# llama.cpp file types (llama-quantize's names) -> the type most of their linear weights get
FILE_TYPES = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "IQ4_XS": "IQ4_XS",
    "IQ4_NL": "IQ4_NL",
}
TYPES = tuple(FILE_TYPES)


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


def _k_affine(blocks: np.ndarray, levels: int, sub_size: int = 32, scale_max: int = 63):
    """Per `sub_size`-value sub-block: q in 0..levels with x ~ d*sc*q - dmin*m, sc and m in 0..scale_max
    (Q4_K: 15 levels, Q5_K: 31, both 6-bit scales of 32 values; Q2_K: 3 levels, 4-bit scales of 16 values)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, -1, sub_size)
    lo = np.minimum(sub.min(axis=-1), 0)
    hi = sub.max(axis=-1)
    scale, mins = (hi - lo) / levels, -lo
    d = scale.max(axis=-1, keepdims=True) / scale_max
    dmin = mins.max(axis=-1, keepdims=True) / scale_max
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16), 0).clip(0, scale_max)
        m = np.where(dmin16 > 0, np.rint(mins / dmin16), 0).clip(0, scale_max)
        step = (d16 * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin16 * m)[..., None]) / step), 0).clip(0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _nibble_pack(q: np.ndarray, n: int, group: int) -> np.ndarray:
    """Values [n, 2k*group] (0..15): pairs of `group`-long runs share bytes, the first in the low nibbles."""
    q = q.reshape(n, -1, 2, group)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _crumb_pack(q: np.ndarray, n: int) -> np.ndarray:
    """Values [n, 256] (0..3): per 128-value half, values s*32+l (s = 0..3) share byte l, s-th pair of bits."""
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)


def quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, m, q = _k_affine(blocks, 3, sub_size=16, scale_max=15)
    scales = sc.astype(np.uint8) | (m.astype(np.uint8) << 4)
    return np.concatenate([scales, _crumb_pack(q, n), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Symmetric: q in -4..3 per 16 values, the largest magnitude at -4 (as Q4_0 puts it at -8)."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    peak = np.take_along_axis(sub, np.abs(sub).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = peak / -4
    d = np.abs(scale).max(axis=-1, keepdims=True) / 31
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16), 0).clip(-32, 31)
        step = (d16 * sc)[..., None]
        q = np.where(step != 0, np.rint(sub / step), 0).clip(-4, 3)
    u = (q + 4).astype(np.uint8).reshape(n, 8, 32)  # 0..7; bit 2 goes to the mask, set for q >= 0
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):  # bit j of byte l: the high bit of value 32*j + l
        hmask |= ((u[:, j] >> 2) & 1) << j
    s6 = (sc + 32).astype(np.uint8)  # 0..63
    low = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
    h = (s6 >> 4).reshape(n, 4, 4)  # scale 4*t + k: bits 2t of byte k
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return np.concatenate([hmask, _crumb_pack(u & 3, n), low, high, _f16_bytes(d)], axis=1)


IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _iq4_pick(sub: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The nearest of the 16 IQ4 levels to each value / step (level 1 where the step is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(step != 0, sub / step, 0)
    return np.abs(x[..., None] - IQ4_LEVELS).argmin(axis=-1).astype(np.uint8)


def quantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """The largest magnitude at level -127; the rest to their nearest level."""
    n = blocks.shape[0]
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[:, None], axis=-1)
    d = (peak / -127).astype(np.float16)
    q = _iq4_pick(blocks, d.astype(np.float32))
    return np.concatenate([d.view(np.uint8), _nibble_pack(q, n, 16)], axis=1)


def quantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    peak = np.take_along_axis(sub, np.abs(sub).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = peak / -127
    d = np.abs(scale).max(axis=-1, keepdims=True) / 31
    d16 = d.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16), 0).clip(-32, 31)
    q = _iq4_pick(sub, (d16 * sc)[..., None])
    u = (sc + 32).astype(np.uint16)  # 0..63
    low = ((u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)).astype(np.uint8)
    high = np.zeros(n, dtype=np.uint16)
    for j in range(8):  # bits 2j, 2j+1: scale j's top two bits
        high |= (u[:, j] >> 4) << (2 * j)
    return np.concatenate([_f16_bytes(d), high.astype("<u2").reshape(n, 1).view(np.uint8), low,
                           _nibble_pack(q.reshape(n, -1), n, 16)], axis=1)


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
    own = {T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k, T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k,
           T.Q6_K: quantize_q6_k, T.IQ4_NL: quantize_iq4_nl, T.IQ4_XS: quantize_iq4_xs}
    if qtype in own:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = values.reshape(-1, values.shape[-1])
        blocks = rows.reshape(-1, block)
        step = max(1, (1 << 20) // block)  # a million values at a time: full-size T5 tensors stay in memory bounds
        data = np.concatenate([own[qtype](blocks[i:i + step]) for i in range(0, blocks.shape[0], step)])
        data = data.reshape(rows.shape[0], -1)
        assert data.shape[1] == values.shape[-1] // block * size
        return data.reshape(*values.shape[:-1], -1), qtype
    return gguf.quants.quantize(values, qtype), qtype


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of the layers whose attn_v/ffn_down get more bits in the _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mixed_type(role: str, layer: int, n_layers: int, file_type: str, base: str) -> str:
    """llama-quantize's type for a T5 encoder's attn_v / ffn_down weight (llama.cpp src/llama-quant.cpp,
    llama_tensor_get_type_impl: one KV head per head, no experts; T5's attn_o is not `attn_output`, so the
    attention-output rules do not reach it)."""
    if file_type == "Q2_K":
        return "Q3_K"
    if file_type == "Q3_K_L":
        return "Q5_K"
    if file_type == "Q3_K_M":
        first = layer < 2 if role == "attn_v" else layer < n_layers // 16
        return "Q5_K" if first else "Q4_K"
    if file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
        return "Q6_K"
    if file_type == "Q4_K_S" and (layer < 4 if role == "attn_v" else layer < n_layers // 8):
        return "Q5_K"
    if file_type in ("IQ4_XS", "IQ4_NL") and role == "ffn_down" and layer < n_layers // 8:
        return "Q5_K"  # without an importance matrix, as these files are made here
    return base


# llama.cpp's tensor_type_fallback: a row that is not a whole number of blocks takes a 32-wide type
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def tensor_type(hf_key: str, shape: tuple[int, ...], file_type: str, n_layers: int = 24) -> str:
    """The GGUF type a tensor gets in a file of `file_type` (e.g. Q3_K_M) of a T5 encoder of `n_layers` blocks, as
    llama-quantize picks it: norms F32, the relative attention bias F16 (neither quantized), the token embedding
    (a T5 encoder has no output.weight, so it takes the output's rule) Q6_K unless the file is Q8_0, attn_v and
    ffn_down by the mix's rules, the rest in the file's base type."""
    import gguf

    if len(shape) < 2 or "relative_attention_bias" in hf_key:
        return "F32" if len(shape) < 2 else "F16"
    base = FILE_TYPES[file_type]
    if base in ("F32", "F16", "BF16"):
        return base

    def fits(name: str) -> bool:
        return shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0] == 0

    if hf_key == "shared.weight":
        base = "Q6_K" if base != "Q8_0" and fits(base) else "Q8_0"
    elif hf_key.endswith(("SelfAttention.v.weight", "DenseReluDense.wo.weight")):
        role = "attn_v" if hf_key.endswith(".v.weight") else "ffn_down"
        base = _mixed_type(role, int(hf_key.split(".")[2]), n_layers, file_type, base)
    if not fits(base):
        base = FALLBACK.get(base, "F16")
    return base if fits(base) else "F16"


def layout_bytes(config: dict, file_type: str, recipe_layers: int, dtype_bytes: int) -> tuple[int, int]:
    """(tensor bytes of the GGUF file, bytes of the model pixart_core loads from it) for a T5 of `config` (a
    T5Config dict) typed as the first blocks of a `recipe_layers`-block `file_type` file: the loader keeps linear
    weights in their file types and dequantizes the rest (embedding, norms, relative attention bias) to the compute
    dtype of `dtype_bytes` bytes."""
    import gguf
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    linears = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    file_bytes = memory = 0
    for key, p in model.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        qtype = gguf.GGMLQuantizationType[tensor_type(key, tuple(p.shape), file_type, recipe_layers)]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        file_bytes += p.numel() // block * size
        memory += p.numel() // block * size if key in linears else p.numel() * dtype_bytes
    return file_bytes, memory


def write_t5_gguf(model_or_sd, path: Path, file_type: str = "Q8_0", arch: str | bytes | int | None = "t5encoder",
                  shapes: dict[str, tuple[int, ...]] | None = None, extra: dict[str, np.ndarray] | None = None,
                  recipe_layers: int | None = None, big_endian: bool = False, extra_first: bool = False) -> Path:
    """A GGUF T5 encoder file of a T5EncoderModel (or its state dict): `file_type` one of TYPES; `arch` the
    general.architecture written (None: none, as stable-diffusion.cpp writes; bytes: a string of those bytes,
    UTF-8 or not; an int: a uint32 field); `shapes` overrides the shape a tensor is written with (a broken file);
    `extra` more tensors by GGUF name (e.g. a full T5's decoder, `dec.blk.0.attn_q.weight`), written as F32 after
    the model's (before them with `extra_first`);
    `recipe_layers` the block count whose mix the types follow (default: the model's; 24 gives the first blocks of
    a T5-XXL file); `big_endian` a big-endian file (gguf-py's writer byte-swaps the values, as llama.cpp's converter
    does with --bigendian for s390x)."""
    import gguf
    import torch

    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    n_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_blocks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(tmp), arch if isinstance(arch, (str, bytes)) else "", endianess=endian)
    if not isinstance(arch, (str, bytes)):
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    if isinstance(arch, int):
        writer.add_uint32(gguf.Keys.General.ARCHITECTURE, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny T5-v1.1 encoder")

    def add_extra() -> None:
        for name, values in (extra or {}).items():
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))

    if extra_first:
        add_extra()
    for key, value in sd.items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        name = names.get_name(key, try_suffixes=(".weight",))
        assert name is not None, key
        values = value.detach().to(torch.float32).numpy()
        if shapes and key in shapes:
            values = np.resize(values, shapes[key]).astype(np.float32)
        data, qtype = quantize(values, tensor_type(key, values.shape, file_type, recipe_layers or n_blocks))
        writer.add_tensor(name, data, raw_dtype=qtype)
    if not extra_first:
        add_extra()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path

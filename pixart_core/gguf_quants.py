"""GGML block dequantization in torch: every GGUF tensor type ComfyUI-GGUF reads (F32, F16, BF16, Q8_0, Q5_1, Q5_0,
Q4_1, Q4_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, IQ4_NL, IQ4_XS).

Each block function takes blocks [n, type_size] (uint8) and returns their values [n, block_size] in float32, with
the same float32 operations in the same order as gguf-py's numpy reference (`gguf.quants.dequantize`), so the
results are bit-identical. The layouts are ggml's (ggml-common.h block_q4_0 ... block_q6_K). Pure torch: runs on
whatever device the bytes are on; imports neither gguf nor ComfyUI.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

QK_K = 256  # values in a K-quant super-block


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifts(values: list[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)


def _nibbles(qs: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """Low then high 4 bits of each byte of `qs` [n, k*group], as [n, k, 2, group] -> [n, 2k*group]."""
    q = qs.reshape(n, -1, 1, group) >> _shifts([0, 4], (1, 1, 2, 1), qs)
    return (q & 0x0F).reshape(n, -1)


def _crumbs(qs: torch.Tensor, n: int) -> torch.Tensor:
    """The four 2-bit fields of each byte of `qs` [n, k*32], as [n, k, 4, 32] -> [n, 4k*32] (Q2_K/Q3_K low bits)."""
    q = qs.reshape(n, -1, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qs)
    return (q & 0x03).reshape(n, -1)


def _bits32(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Bit i of the little-endian uint32 in `qh` [n, 4] for i = 0..31, as int32 [n, 32] (Q5_0/Q5_1 high bits)."""
    q = qh.to(torch.int32)
    q = q[:, 0] | q[:, 1] << 8 | q[:, 2] << 16 | q[:, 3] << 24
    return (q.reshape(n, 1) >> torch.arange(32, dtype=torch.int32, device=qh.device).reshape(1, 32)) & 1


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    """block_q8_0: fp16 d, 32 int8 q; x = d*q."""
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).to(torch.float32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    """block_q4_0: fp16 d, 16 bytes of nibbles (values j and j+16 share byte j); x = d*(q-8)."""
    n = b.shape[0]
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:], n, 16).to(torch.float32) - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    """block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles as Q4_0; x = d*q + m."""
    n = b.shape[0]
    return _f16(b[:, :2]) * _nibbles(b[:, 4:], n, 16).to(torch.float32) + _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    """block_q5_0: fp16 d, uint32 of high bits, 16 bytes of low nibbles as Q4_0; x = d*(q-16)."""
    n = b.shape[0]
    q = _nibbles(b[:, 6:], n, 16).to(torch.int32) | (_bits32(b[:, 2:6], n) << 4)
    return _f16(b[:, :2]) * (q.to(torch.float32) - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    """block_q5_1: fp16 d, fp16 m, uint32 of high bits, 16 bytes of low nibbles as Q4_0; x = d*q + m."""
    n = b.shape[0]
    q = _nibbles(b[:, 8:], n, 16).to(torch.int32) | (_bits32(b[:, 4:8], n) << 4)
    return _f16(b[:, :2]) * q.to(torch.float32) + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    """block_q2_K: 16 bytes of 4-bit scale | 4-bit min per 16 values, 64 bytes of 2-bit q, fp16 d, fp16 dmin;
    x = d*scale*q - dmin*min."""
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b[:, 80:82]) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_f16(b[:, 82:84]) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _crumbs(qs, n).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    """block_q3_K: 32 bytes of high-bit mask, 64 bytes of 2-bit low q, 12 bytes of sixteen 6-bit scales, fp16 d;
    x = d*(scale-32)*(q - 4 where the mask bit is 0)."""
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], (1, 2, 1), b)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], (1, 4, 1), b)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.float32) - 32
    dl = (_f16(b[:, 108:110]) * sc).reshape(n, 16, 1)
    bit = (hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)) & 1
    q = _crumbs(qs, n).to(torch.float32) - 4 * (1 - bit.reshape(n, -1)).to(torch.float32)
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins packed in 12 bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins per 32 values, 128 bytes of nibbles;
    x = d*scale*q - dmin*min."""
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], n, 32).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    """block_q5_K: as block_q4_K with 32 bytes of high bits (bit j of byte l: sub-block j, value l) before the
    nibbles."""
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn).reshape(n, 8, 1)
    qh = b[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    q = _nibbles(b[:, 48:], n, 32).reshape(n, 8, 32) | ((qh & 1) << 4)
    return (d * q.to(torch.float32) - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """block_q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, fp16 d;
    x = d*scale*(q-32)."""
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    d = (_f16(d) * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, n, 64).reshape(n, 8, 32)
    high = qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], (1, 1, 4, 1), qh)
    q = (low | ((high & 0x03).reshape(n, 8, 32) << 4)).to(torch.float32) - 32
    return (d * q.reshape(n, 16, 16)).reshape(n, QK_K)


# ggml-common.h kvalues_iq4nl: the 16 levels IQ4_NL/IQ4_XS nibbles index
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_levels(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=q.device)[q.long()]


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    """block_iq4_nl: fp16 d, 16 bytes of nibbles as Q4_0; x = d*level[q]."""
    n = b.shape[0]
    return _f16(b[:, :2]) * _iq4_levels(_nibbles(b[:, 2:], n, 16))


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    """block_iq4_xs: fp16 d, uint16 of 2-bit high scale parts, 4 bytes of 4-bit low parts (eight 6-bit scales per
    32 values), 128 bytes of nibbles as Q4_0 per 32 values; x = d*(scale-32)*level[q]."""
    n = b.shape[0]
    low = (b[:, 4:8].reshape(n, 4, 1) >> _shifts([0, 4], (1, 1, 2), b)).reshape(n, 8) & 0x0F
    high16 = b[:, 2].to(torch.int32) | b[:, 3].to(torch.int32) << 8
    high = (high16.reshape(n, 1) >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device).reshape(1, 8)) & 0x03
    sc = (low.to(torch.int32) | (high << 4)).to(torch.float32) - 32
    dl = (_f16(b[:, :2]) * sc).reshape(n, 8, 1)
    return (dl * _iq4_levels(_nibbles(b[:, 8:], n, 16)).reshape(n, 8, 32)).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    """bfloat16 values, two bytes each."""
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


class QuantType(NamedTuple):
    name: str
    block: int  # values per block
    size: int  # bytes per block
    blocks: Callable[[torch.Tensor], torch.Tensor] | None  # None: F32/F16, kept as torch tensors of their own dtype


# ggml's type ids (ggml.h enum ggml_type) -> how the type is read
TYPES: dict[int, QuantType] = {
    0: QuantType("F32", 1, 4, None), 1: QuantType("F16", 1, 2, None), 30: QuantType("BF16", 1, 2, _bf16),
    8: QuantType("Q8_0", 32, 34, _q8_0),
    7: QuantType("Q5_1", 32, 24, _q5_1), 6: QuantType("Q5_0", 32, 22, _q5_0),
    3: QuantType("Q4_1", 32, 20, _q4_1), 2: QuantType("Q4_0", 32, 18, _q4_0),
    14: QuantType("Q6_K", QK_K, 210, _q6_k), 13: QuantType("Q5_K", QK_K, 176, _q5_k),
    12: QuantType("Q4_K", QK_K, 144, _q4_k), 11: QuantType("Q3_K", QK_K, 110, _q3_k),
    10: QuantType("Q2_K", QK_K, 84, _q2_k),
    20: QuantType("IQ4_NL", 32, 18, _iq4_nl), 23: QuantType("IQ4_XS", QK_K, 136, _iq4_xs),
}

CHUNK_VALUES = 1 << 21  # with `chunked`, dequantize this many values at a time (8 MB of float32 temporaries)


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...], dtype: torch.dtype,
               chunked: bool = False) -> torch.Tensor:
    """A GGUF tensor's values: `raw` holds its bytes (uint8) or, for F32/F16, its values; on raw's device.

    The block formulas compute in float32 (as gguf-py's reference does), then cast to `dtype`. `chunked` runs them
    a chunk at a time into the `dtype` result, so the float32 temporaries stay small (for the load-time embedding:
    ~2x slower on a CPU, so the per-forward dequantization takes the whole weight at once)."""
    if raw.dtype != torch.uint8:  # F32 / F16 are kept as torch tensors of their own dtype
        return raw.to(dtype).reshape(shape)
    kind = TYPES[int(qtype)]
    blocks = raw.reshape(-1, kind.size)
    step = max(1, CHUNK_VALUES // kind.block)
    if not chunked or blocks.shape[0] <= step:
        return kind.blocks(blocks).reshape(shape).to(dtype)
    out = torch.empty((blocks.shape[0], kind.block), dtype=dtype, device=raw.device)
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = kind.blocks(blocks[i:i + step])
    return out.reshape(shape)


def is_readable(qtype: int) -> bool:
    """Whether `dequantize` reads GGUF tensors of this ggml type id."""
    return int(qtype) in TYPES


def supported_types() -> list[str]:
    """The names of the GGUF tensor types read here, sorted."""
    return sorted(t.name for t in TYPES.values())

"""The DiT's inference memory: what one forward needs beyond its weights (for ComfyUI's memory accounting)."""
from __future__ import annotations

import torch

RESERVE = 64 << 20  # kernel workspaces and what the formula leaves out (embedders, caption projection)


def inference_memory(batch: int, height: int, width: int, inner: int, dtype: torch.dtype, cfg: bool,
                     fused_attention: bool = True, heads: int = 16) -> int:
    """Bytes of activations one DiT forward needs beyond its weights (an upper estimate, for ComfyUI): the larger of
    a block's two phases, counted in rows of `inner` values per token and image, plus RESERVE.

    Feed-forward: the residual stream, the modulated norm, the 4x projection and its GELU (12 rows). Attention with
    a fused SDPA kernel (flash / memory-efficient: O(tokens) memory) stays within that: the residual, the norm, q,
    k, v and the output in `dtype`, an fp32 accumulator the output's size and the fp32 logsumexp per head, i.e.
    rows * (6 * size + 4) + n * heads * tokens * 4 bytes, below 12 rows for heads of 4 values or more. SDPA's math
    kernel computes in fp32 (torch upcasts fp16/bf16 inputs unless
    allow_fp16_bf16_reduction_math_sdp is set) and holds each head's tokens x tokens scores and their softmax at
    once: counted whole (16 GiB at 2K with CFG), with the residual, norm, q, k, v and output in `dtype`, their fp32
    copies, the scaled q and k and the fp32 output. Measured against torch's CPU allocator in
    tests/core/test_dit_memory.py.
    """
    n = batch * (2 if cfg else 1)
    tokens = (height // 16) * (width // 16)
    size = torch.tensor([], dtype=dtype).element_size()
    rows = n * tokens * inner  # one [n, tokens, inner] tensor, in values
    feed_forward = rows * 12 * size
    if fused_attention:
        return feed_forward + RESERVE
    upcast = 0 if size == 4 else 3 * 4  # fp32 copies of q, k and v
    attention = rows * (6 * size + upcast + 3 * 4) + 2 * n * heads * tokens * tokens * 4
    return max(feed_forward, attention) + RESERVE


def control_memory(batch: int, height: int, width: int, inner: int, dtype: torch.dtype, controls: int) -> int:
    """Bytes ControlNets add to one DiT forward: each keeps its control stream and its block output beside the DiT's
    stream ([N, tokens, inner] each); their blocks run between the DiT's, so no more than a DiT block at a time."""
    tokens = (height // 16) * (width // 16)
    return controls * 2 * batch * tokens * inner * torch.tensor([], dtype=dtype).element_size()

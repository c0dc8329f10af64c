"""The DiT's inference memory: what one forward needs beyond its weights (for ComfyUI's memory accounting)."""
from __future__ import annotations

import torch


def inference_memory(batch: int, height: int, width: int, inner: int, dtype: torch.dtype, cfg: bool,
                     fused_attention: bool = True, heads: int = 16) -> int:
    """Bytes of activations one DiT forward needs beyond its weights (rough upper estimate, for ComfyUI).

    With a fused SDPA kernel (flash / memory-efficient) attention needs no more than the MLP, so its share is
    capped at 4x the MLP's; SDPA's math kernel materialises every head's tokens x tokens score matrix (~17 GiB at
    2K in bf16 with CFG), which is counted whole.
    """
    n = batch * (2 if cfg else 1)
    tokens = (height // 16) * (width // 16)
    size = torch.tensor([], dtype=dtype).element_size()
    mlp_and_qkv = n * tokens * inner * 12 * size  # the widest intermediate (MLP 4x, q/k/v, residuals) live at once
    attention = n * heads * tokens * tokens * size  # the math kernel's score matrix
    return mlp_and_qkv + (min(attention, 4 * mlp_and_qkv) if fused_attention else attention) + (64 << 20)


def control_memory(batch: int, height: int, width: int, inner: int, dtype: torch.dtype, controls: int) -> int:
    """Bytes ControlNets add to one DiT forward: each keeps its control stream and its block output beside the DiT's
    stream ([N, tokens, inner] each); their blocks run between the DiT's, so no more than a DiT block at a time."""
    tokens = (height // 16) * (width // 16)
    return controls * 2 * batch * tokens * inner * torch.tensor([], dtype=dtype).element_size()

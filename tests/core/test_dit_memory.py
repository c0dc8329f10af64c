"""The DiT's inference-memory estimate (pixart_core.dit_memory, what the sampler asks ComfyUI to keep free) against
the peak that torch's CPU allocator sees during one forward (torch.profiler's memory events), for SDPA's fused
kernel (the CPU's flash kernel) and its math kernel, and a written-out computation at 2K."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from harness import models as tiny
from pixart_core import dit_memory

INNER, HEADS = 1152, 16  # PixArt XL/2 (diffusers' PixArtTransformer2DModel defaults: 16 heads x 72)


def _peak_bytes(fn) -> int:
    """The most bytes allocated at once while fn runs, beyond what was allocated before (torch's CPU allocator,
    as torch.profiler records each allocation and free)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def xl_blocks():
    """PixArt XL/2's width (1152, 16 heads x 72, caption width 4096) with two blocks: the peak is one block's."""
    dit = tiny.make_dit("bench", layers=2)
    assert (dit.config.num_attention_heads * dit.config.attention_head_dim, dit.config.num_attention_heads) == (INNER, HEADS)
    return dit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("px", [256, 512])
@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_estimate_covers_the_measured_peak_and_stays_close(xl_blocks, dtype, px, kernel):
    """One CFG-batched forward: the estimate is at least the measured peak and, without its fixed reserve, at most
    1.25x it (the old fused estimate was 2.2x at 512 px; the old math one under the peak)."""
    dit = xl_blocks.to(dtype)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, px // 8, px // 8, dtype=dtype),
                  encoder_hidden_states=torch.randn(2, 20, 4096, dtype=dtype), timestep=torch.tensor([999, 999]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    backends = [SDPBackend.FLASH_ATTENTION] if kernel == "fused" else [SDPBackend.MATH]
    with torch.no_grad(), sdpa_kernel(backends):
        measured = _peak_bytes(lambda: dit(**inputs))
    estimate = dit_memory.inference_memory(1, px, px, INNER, dtype, cfg=True, fused_attention=kernel == "fused")
    assert measured <= estimate, f"measured {measured / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB"
    assert estimate - (64 << 20) <= 1.25 * measured, f"{estimate / 2**20:.1f} MiB for {measured / 2**20:.1f} MiB"


def test_estimate_at_2k_written_out():
    """2048 x 2048 px (16384 tokens), bf16, CFG (2 images), PixArt XL/2 (1152 wide, 16 heads)."""
    tokens, n, reserve = 128 * 128, 2, 64 << 20
    # fused kernel: the feed-forward's 12 rows of 1152 bf16 values per token dominate: 906 MiB (was 4.4 GiB: the
    # attention term was 4x that)
    feed_forward = n * tokens * 1152 * 12 * 2
    assert dit_memory.inference_memory(1, 2048, 2048, 1152, torch.bfloat16, True) == feed_forward + reserve
    # math kernel: each head's fp32 scores and their softmax (2 x 2 x 16 x 16384^2 x 4 bytes = 64 GiB), and per token
    # the residual, norm, q, k, v and output in bf16 (6 x 2 bytes), fp32 copies of q, k, v (3 x 4), the scaled q and
    # k and the fp32 output (3 x 4)
    scores = 2 * n * 16 * tokens * tokens * 4
    rows = n * tokens * 1152 * (6 * 2 + 3 * 4 + 3 * 4)
    assert dit_memory.inference_memory(1, 2048, 2048, 1152, torch.bfloat16, True, fused_attention=False) == \
        scores + rows + reserve


def test_estimate_in_fp32_with_the_math_kernel_written_out():
    """1024 x 1024 px (4096 tokens), fp32, CFG: SDPA's math kernel needs no fp32 copies of q, k and v when they are
    fp32 already."""
    tokens, n, reserve = 64 * 64, 2, 64 << 20
    scores = 2 * n * 16 * tokens * tokens * 4  # each head's fp32 scores and their softmax
    rows = n * tokens * 1152 * (6 * 4 + 3 * 4)  # residual, norm, q, k, v, output; scaled q and k, fp32 output
    assert dit_memory.inference_memory(1, 1024, 1024, 1152, torch.float32, True, fused_attention=False) == \
        scores + rows + reserve

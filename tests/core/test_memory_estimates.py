"""The memory the pack asks ComfyUI for: the VAE decode/encode estimates against ComfyUI's own formulas, and the DiT
activation estimate against what any activation estimate must do."""
from __future__ import annotations

import pytest
import torch

from pixart_core import dit_memory
from pixart_core import vae as cvae


def inspect_default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
@pytest.mark.parametrize("h,w", [(128, 128), (64, 96), (8, 8)])
def test_decode_memory_is_comfyuis_estimate(dtype, size, h, w):
    # ComfyUI 0.3.75 comfy/sd.py:291 (AutoencoderKL): (2178 * h * w * 64) * dtype_size * VAE_KL_MEM_RATIO (1.0 off AMD)
    want = 2178 * h * w * 64 * size
    assert cvae.decode_memory((1, 4, h, w), dtype) == want
    assert cvae.decode_memory((1, 4, h, w), dtype, base_channels=32) == want // 4  # a quarter-width decoder
    # comfy/sd.py:290: encode (1767 * H * W) * dtype_size for an image of H x W pixels
    assert cvae.encode_memory((1, h * 8, w * 8, 3), dtype) == 1767 * h * 8 * w * 8 * size
    assert cvae.encode_memory((1, h * 8, w * 8, 3), dtype, base_channels=64) == 1767 * h * 8 * w * 8 * size // 2
    for got in (cvae.decode_memory((1, 4, h, w), dtype), cvae.encode_memory((1, h * 8, w * 8, 3), dtype)):
        assert type(got) is int  # bytes, as ComfyUI's memory accounting takes them


def test_inference_memory_scales_as_activations_do():
    """No outside formula exists for this estimate; what any activation estimate must do: linear in the images run
    (CFG doubles them), proportional to bytes per element, growing with the token count, and a fixed reserve."""
    reserve = 64 << 20
    one = dit_memory.inference_memory(1, 256, 256, 1152, torch.float32, cfg=False) - reserve
    assert dit_memory.inference_memory(2, 256, 256, 1152, torch.float32, cfg=False) - reserve == 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 1152, torch.float32, cfg=True) - reserve == 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 1152, torch.bfloat16, cfg=False) - reserve == one // 2
    assert dit_memory.inference_memory(1, 512, 256, 1152, torch.float32, cfg=False) - reserve >= 2 * one
    assert dit_memory.inference_memory(1, 256, 256, 2304, torch.float32, cfg=False) - reserve > one
    # at least the MLP activations of one forward: 256 tokens x 4 x 1152 fp32 values
    assert one >= (256 // 16) ** 2 * 4 * 1152 * 4
    tokens = (2048 // 16) ** 2
    big = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False) - reserve
    assert big <= 5 * tokens * 1152 * 12 * 4  # a fused attention kernel needs no more than the MLP part
    # SDPA's math kernel holds every head's tokens x tokens scores (16 heads in PixArt XL/2): counted whole
    math = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False, fused_attention=False) - reserve
    assert math >= 16 * tokens * tokens * 4 > big
    # one head's score matrix is tokens x tokens values: the default is PixArt XL/2's 16 heads (diffusers' default
    # num_attention_heads for PixArtTransformer2DModel)
    from diffusers import PixArtTransformer2DModel

    heads = inspect_default(PixArtTransformer2DModel.__init__, "num_attention_heads")
    assert heads == 16
    one_head_less = dit_memory.inference_memory(1, 2048, 2048, 1152, torch.float32, cfg=False, fused_attention=False,
                                              heads=heads - 1) - reserve
    assert math - one_head_less == 2 * tokens * tokens * 4  # one head's fp32 scores and their softmax
    for args in [(1, 256, 256, 1152, torch.float32, False), (3, 1024, 512, 1152, torch.bfloat16, True)]:
        assert type(dit_memory.inference_memory(*args)) is int
        assert type(dit_memory.inference_memory(*args, fused_attention=False)) is int


@torch.no_grad()
def test_control_memory_is_what_the_controlnets_keep_in_a_real_forward(tmp_path):
    """Measured on pixart_core's controlled forward (the published composition, tests/core/test_controlnet.py): before
    each base block every ControlNet holds its control stream and its block's output beside the DiT's stream; the
    estimate is the bytes of those tensors, for each ControlNet, at the largest they get."""
    from harness import controlnet_files as cfiles
    from harness import models as tiny
    from pixart_core import controlnet as cn
    from pixart_core import controlnet_files as cnf

    dtype = torch.bfloat16
    dit = tiny.make_dit(layers=4).to(dtype)
    kept: dict[int, int] = {}
    controls = []
    for k, blocks in enumerate((3, 2)):  # two adapters of different depth
        sd = {n: t.to(dtype) for n, t in cfiles.adapter_state_dict(dit, blocks, seed=30 + k).items()}
        adapter = cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / f"a{k}.safetensors", sd))[0].to(dtype)
        for block in adapter.controlnet_blocks:
            block.register_forward_hook(lambda m, args, out, k=k: kept.__setitem__(
                k, max(kept.get(k, 0), sum(t.numel() * t.element_size() for t in out))))
        controls.append(cn.Control(adapter, torch.randn(1, 4, 6, 10, dtype=dtype)))
    batch, h, w = 2, 6, 10  # latent pixels: an image of 48 x 80 pixels, 3 x 5 tokens of the 2x2 patch
    x = torch.randn(batch, 4, h, w, dtype=dtype)
    embeds = torch.randn(batch, 5, dit.config.caption_channels, dtype=dtype)
    cn.controlled_forward(dit, controls, x, encoder_hidden_states=embeds, encoder_attention_mask=torch.ones(batch, 5),
                          timestep=torch.full((batch,), 400), added_cond_kwargs={"resolution": None,
                                                                                 "aspect_ratio": None})
    assert sorted(kept) == [0, 1]
    got = dit_memory.control_memory(batch, h * 8, w * 8, dit.inner_dim, dtype, controls=2)
    assert got == kept[0] + kept[1] == 2 * (2 * batch * 3 * 5 * dit.inner_dim * 2)
    assert type(got) is int  # bytes, as ComfyUI's memory accounting takes them
    assert dit_memory.control_memory(batch, h * 8, w * 8, dit.inner_dim, torch.float32, controls=1) == kept[0] * 2

"""The published PixArt ControlNet composition written out with diffusers' own modules, the reference the tests compare
the pack's controlled DiT with: the research project's PixArtControlNetTransformerModel.forward (diffusers
examples/research_projects/pixart/controlnet_pixart_alpha.py) and the authors' ControlPixArtHalf.forward
(PixArt-alpha diffusion/model/nets/pixart_controlnet.py). The hint goes through the DiT's own pos_embed; before base
block i (i = 1..N) control block i-1 runs on the stream entering block i (block 0 on that stream + before_proj(hint))
with the same embedded timestep, projected captions and masks; its after_proj output, times a strength, is added to
the stream. Built from the adapter file's state dict (keys from the reference code), never from pixart_core. Never
imports ComfyUI."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class ReferenceAdapter:
    """One adapter as the research project builds it, from diffusers' own modules: copies of the DiT's
    BasicTransformerBlock (the adapter's blocks are configured like PixArt's) and nn.Linear, loaded from an
    adapter-layout state dict (`controlnet_blocks.{i}.{before_proj,transformer_block,after_proj}.*`)."""

    def __init__(self, dit, sd: dict[str, torch.Tensor], blocks: int, strength: float = 1.0):
        width = dit.config.num_attention_heads * dit.config.attention_head_dim

        def part(prefix):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        self.blocks = []
        for i in range(blocks):
            block = copy.deepcopy(dit.transformer_blocks[i])
            block.load_state_dict(part(f"controlnet_blocks.{i}.transformer_block."))
            self.blocks.append(block)
        self.before = nn.Linear(width, width)
        self.before.load_state_dict(part("controlnet_blocks.0.before_proj."))
        self.after = []
        for i in range(blocks):
            linear = nn.Linear(width, width)
            linear.load_state_dict(part(f"controlnet_blocks.{i}.after_proj."))
            self.after.append(linear)
        self.strength = strength


@contextlib.contextmanager
def controlled(dit, refs: Sequence[ReferenceAdapter], hints: Sequence[torch.Tensor]) -> Iterator[None]:
    """For the duration, every forward of diffusers' own PixArtTransformer2DModel `dit` (a pipeline's too) runs the
    published control order, put in front of each base block by a forward pre-hook (which sees the block's own
    inputs: the stream, the embedded timestep, the projected captions and the mask bias). `hints[j]`: the scaled
    VAE latents of adapter j's control image, [1 or B, 4, h, w] at the latents' size."""
    streams: list[torch.Tensor] = []

    def hook_for(index):
        def hook(module, args, kw):
            h = args[0]
            if index == 1:  # a new forward: the hints through the DiT's patch embedding, repeated to its batch
                streams[:] = [dit.pos_embed(hint.to(h)).repeat(h.shape[0] // hint.shape[0], 1, 1) for hint in hints]
            common = {k: kw[k] for k in ("encoder_hidden_states", "timestep", "attention_mask",
                                         "encoder_attention_mask", "cross_attention_kwargs")}
            adds = []
            for j, ref in enumerate(refs):
                if index > len(ref.blocks):
                    continue
                c = streams[j]
                if index == 1:
                    c = h + ref.before(c)
                c = ref.blocks[index - 1](c, **common)
                streams[j] = c
                adds.append(ref.after[index - 1](c) * ref.strength)
            for a in adds:
                h = h + a
            return (h, *args[1:]), kw
        return hook

    handles = [dit.transformer_blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i in range(1, len(dit.transformer_blocks))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_forward(dit, refs: Sequence[ReferenceAdapter], hints: Sequence[torch.Tensor], x: torch.Tensor,
                      kwargs: dict) -> torch.Tensor:
    """One forward of diffusers' own PixArtTransformer2DModel with the published control order: [N, C_out, H, W]."""
    with controlled(dit, refs, hints):
        return dit(x, return_dict=False, **kwargs)[0]

"""PixArt ControlNet (PixArt-δ's ControlNet-Transformer): the adapter, the controlled DiT forward, hint latents.

The adapter is the layout of diffusers' research project (examples/research_projects/pixart/controlnet_pixart_alpha.py,
PixArtControlNetAdapterModel) and SimpleTuner's PixArtSigmaControlNetAdapterModel: `controlnet_blocks.{i}` each hold a
diffusers BasicTransformerBlock configured like PixArt's (`transformer_block`), a zero-initialised `after_proj` and,
in block 0 only, a zero-initialised `before_proj`. How it runs (both references and the authors' ControlPixArtHalf):
the hint latents go through the base DiT's own patch embedding; before base block i (i = 1..N) control block i-1
runs on the stream entering base block i (block 0 on that stream + before_proj(hint)), with the base blocks' embedded
timestep, projected captions and masks, and its after_proj output is added to the base stream.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .dit_view import DiTView
from .files import WeightFileError
from .transformer import HEAD_DIM


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The shape of a PixArt ControlNet adapter: `blocks` copies of the DiT's first blocks, `heads` x `head_dim` wide."""

    blocks: int
    heads: int
    head_dim: int = HEAD_DIM
    cross_attention_dim: int | None = None  # None: the width (PixArt projects the captions to the width)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


# The released adapters: 13 copied blocks of PixArt XL/2 (PixArt-δ, arXiv 2401.05252 §4; the research project's and
# the authors' default copy_blocks_num).
PRESETS = {"xl-13": AdapterConfig(blocks=13, heads=16)}

_BLOCK_KEY = "controlnet_blocks."
ANCHOR = "controlnet_blocks.0.after_proj.weight"  # every adapter-layout file has it, whatever its prefix


def config_from_state_dict(sd: dict[str, Any], name: str, heads: int | None = None) -> AdapterConfig:
    """The AdapterConfig an adapter-layout state dict (tensors or shapes) implies; `heads` from a config.json if any."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(sd[key].shape) if hasattr(sd[key], "shape") else tuple(sd[key])

    if ANCHOR not in sd:
        raise WeightFileError(f"{name}: no {ANCHOR}; this is not a PixArt ControlNet adapter.")
    indices = sorted({int(k.split(".")[1]) for k in sd if k.startswith(_BLOCK_KEY) and k.split(".")[1].isdigit()})
    if indices != list(range(len(indices))):
        raise WeightFileError(f"{name}: the control blocks are numbered {indices}, not 0..{len(indices) - 1}; "
                              "the file is incomplete. Download it again.")
    width = shape(ANCHOR)[0]
    if heads is None:
        if width % HEAD_DIM:
            raise WeightFileError(f"{name}: control width {width} is not a multiple of PixArt's head size {HEAD_DIM}.")
        heads = width // HEAD_DIM
    if width % heads:
        raise WeightFileError(f"{name}: control width {width} does not split into {heads} heads.")
    cross_key = "controlnet_blocks.0.transformer_block.attn2.to_k.weight"
    cross = shape(cross_key)[1] if cross_key in sd else None  # a missing key is named by the key check later
    return AdapterConfig(blocks=len(indices), heads=heads, head_dim=width // heads, cross_attention_dim=cross)


def _pixart_block(config: AdapterConfig) -> nn.Module:
    """A diffusers BasicTransformerBlock set up as PixArtTransformer2DModel sets up its blocks."""
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock(config.width, config.heads, config.head_dim, dropout=0.0,
                                 cross_attention_dim=config.cross_attention_dim or config.width,
                                 activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
                                 upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                 norm_eps=1e-6, attention_type="default")


class ControlBlock(nn.Module):
    """One control block: [before_proj (block 0)] -> a PixArt transformer block -> after_proj."""

    def __init__(self, config: AdapterConfig, index: int):
        super().__init__()
        self.index = index
        if index == 0:
            self.before_proj = nn.Linear(config.width, config.width)
        self.transformer_block = _pixart_block(config)
        self.after_proj = nn.Linear(config.width, config.width)

    def forward(self, hidden_states: torch.Tensor, control: torch.Tensor,
                **block_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(base stream [N,T,D], control stream [N,T,D]) -> (what to add to the base stream, next control stream)."""
        if self.index == 0:
            control = hidden_states + self.before_proj(control)  # [N, T, D]: the embedded hint joins the base stream
        control = self.transformer_block(control, class_labels=None, **block_kwargs)  # [N, T, D]
        return self.after_proj(control), control


class ControlNetAdapter(nn.Module):
    """A PixArt ControlNet adapter (state dict keys `controlnet_blocks.{i}.{before_proj,transformer_block,after_proj}`)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.controlnet_blocks = nn.ModuleList([ControlBlock(config, i) for i in range(config.blocks)])


@dataclasses.dataclass(frozen=True)
class Control:
    """One adapter applied to a generation: its hint (scaled VAE latents of the control image, [1 or B, 4, h, w]),
    the strength its outputs are added with, and the part of the schedule it acts in ([start, end) as fractions)."""

    adapter: ControlNetAdapter
    hint: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, step: int, steps: int) -> bool:
        """Whether it acts at step `step` (0-based, of `steps`): strength not 0 and the step starts in [start, end)."""
        return self.strength != 0 and self.start <= step / steps < self.end

    def crop(self, y: int, x: int, h: int, w: int) -> Control:
        """The same control over the latent region [y:y+h, x:x+w] of its hint (a tile of the canvas)."""
        return dataclasses.replace(self, hint=self.hint[..., y:y + h, x:x + w])


def _hint_tokens(dit: nn.Module, control: Control, like: torch.Tensor, batch: int) -> torch.Tensor:
    """The hint through the DiT's own patch embedding (+ position table), repeated to the forward's batch."""
    hint = control.hint
    if tuple(hint.shape[-2:]) != tuple(like.shape[-2:]):
        raise ValueError(f"ControlNet hint is {tuple(hint.shape[-2:])} latent pixels but the latents are "
                         f"{tuple(like.shape[-2:])}: encode the control image at the generation's size.")
    if batch % hint.shape[0]:
        raise ValueError(f"ControlNet hint batch {hint.shape[0]} does not divide the model batch {batch}: give one "
                         "control image, or one per image of the batch.")
    tokens = dit.pos_embed(hint.to(device=like.device, dtype=like.dtype))  # [Bh, T, D]
    # The sampler's batch is copies of the image batch ([uncond,] cond[, perturbed]): repeat, not interleave.
    return tokens.repeat(batch // hint.shape[0], 1, 1) if batch != hint.shape[0] else tokens  # [N, T, D]


def controlled_forward(dit: nn.Module, controls: Sequence[Control], hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                       added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                       cross_attention_kwargs: dict[str, Any] | None = None,
                       attention_mask: torch.Tensor | None = None,
                       encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' PixArtTransformer2DModel.forward with the controls' outputs added to the base stream (as the research
    project's PixArtControlNetTransformerModel.forward, each scaled by its strength): [N,4,H,W] -> [N,C_out,H,W].

    Several controls each keep their own control stream; all read the stream entering a base block and their
    scaled outputs are added in order. Controls with strength 0 are skipped."""
    controls = [c for c in controls if c.strength != 0]
    if dit.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
    # masks -> additive biases [N, 1, keys], as diffusers does
    if attention_mask is not None and attention_mask.ndim == 2:
        attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

    batch, patch = hidden_states.shape[0], dit.config.patch_size
    height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
    latents = hidden_states
    hidden_states = dit.pos_embed(hidden_states)  # [N, T, D]
    timestep, embedded_timestep = dit.adaln_single(timestep, added_cond_kwargs, batch_size=batch,
                                                   hidden_dtype=hidden_states.dtype)  # [N, 6D], [N, D]
    if dit.caption_projection is not None:
        encoder_hidden_states = dit.caption_projection(encoder_hidden_states)  # [N, L, D]
        encoder_hidden_states = encoder_hidden_states.view(batch, -1, hidden_states.shape[-1])

    streams = [_hint_tokens(dit, c, latents, batch) for c in controls]  # each [N, T, D]
    block_kwargs = {"attention_mask": attention_mask, "encoder_hidden_states": encoder_hidden_states,
                    "encoder_attention_mask": encoder_attention_mask, "timestep": timestep,
                    "cross_attention_kwargs": cross_attention_kwargs}
    for index, block in enumerate(dit.transformer_blocks):
        if index > 0:
            hidden_states = _add_controls(controls, streams, index, hidden_states, block_kwargs)
        hidden_states = block(hidden_states, class_labels=None, **block_kwargs)  # [N, T, D]

    shift, scale = (dit.scale_shift_table[None]
                    + embedded_timestep[:, None].to(dit.scale_shift_table.device)).chunk(2, dim=1)  # [N, 1, D] each
    hidden_states = dit.norm_out(hidden_states)
    hidden_states = hidden_states * (1 + scale.to(hidden_states.device)) + shift.to(hidden_states.device)
    hidden_states = dit.proj_out(hidden_states).squeeze(1)  # [N, T, p*p*C_out]
    hidden_states = hidden_states.reshape(-1, height, width, patch, patch, dit.out_channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    return hidden_states.reshape(-1, dit.out_channels, height * patch, width * patch)  # [N, C_out, H, W]


def _add_controls(controls: Sequence[Control], streams: list[torch.Tensor], index: int, hidden_states: torch.Tensor,
                  block_kwargs: dict[str, Any]) -> torch.Tensor:
    """The stream entering base block `index` plus each control's block index-1 output times its strength."""
    outputs = []
    for k, control in enumerate(controls):
        blocks = control.adapter.controlnet_blocks
        if index > len(blocks):
            continue
        p = next(blocks[index - 1].parameters())
        kwargs = block_kwargs
        if p.dtype != hidden_states.dtype:  # an adapter kept in another dtype than the DiT computes in
            kwargs = {name: v.to(p.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                      for name, v in block_kwargs.items()}
        out, streams[k] = blocks[index - 1](hidden_states.to(p.dtype), streams[k].to(p.dtype), **kwargs)
        outputs.append(out.to(hidden_states.dtype) * control.strength)
    for out in outputs:
        hidden_states = hidden_states + out
    return hidden_states


class ControlledDiT(DiTView):
    """A PixArt DiT with ControlNets applied: to the sampling loop it looks like the DiT (`config`, `parameters()`,
    submodule names for PAG, the forward signature and output), and its forward is controlled_forward.

    The adapters are not submodules (PAG's layer patterns, e.g. 'blocks.1', must find only the DiT's attention).
    With no control active it calls the DiT's own forward."""

    def __init__(self, dit: nn.Module, controls: Sequence[Control] = ()):
        super().__init__(dit)
        self.controls = tuple(controls)

    def at_step(self, step: int, steps: int) -> ControlledDiT:
        """The same DiT with only the controls active at step `step` of `steps`."""
        return ControlledDiT(self.dit, [c for c in self.controls if c.active(step, steps)])

    def crop(self, y: int, x: int, h: int, w: int) -> ControlledDiT:
        """The same DiT over the latent region [y:y+h, x:x+w] of the canvas (a tile): each hint cropped to it."""
        return ControlledDiT(self.dit, [c.crop(y, x, h, w) for c in self.controls])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        """As PixArtTransformer2DModel.forward: ([N, C_out, H, W],) with return_dict=False."""
        kwargs = {"encoder_hidden_states": encoder_hidden_states, "timestep": timestep,
                  "added_cond_kwargs": added_cond_kwargs, "cross_attention_kwargs": cross_attention_kwargs,
                  "attention_mask": attention_mask, "encoder_attention_mask": encoder_attention_mask}
        if not any(c.strength != 0 for c in self.controls):
            return self.dit(hidden_states, return_dict=return_dict, **kwargs)
        out = controlled_forward(self.dit, self.controls, hidden_states, **kwargs)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


# --- hint latents ----------------------------------------------------------------------------------------------

def fit_image(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,height,width]: scaled (bilinear, antialiased) to cover, then centre-cropped."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = max(height, round(h * ratio)), max(width, round(w * ratio))
    images = nn.functional.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((rh - height) / 2.0), round((rw - width) / 2.0)
    return images[..., top:top + height, left:left + width]


@torch.no_grad()
def encode_hint(vae: nn.Module, images: torch.Tensor, latent_size: tuple[int, int],
                generator: torch.Generator | None = None, scaling_factor: float | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """Control images [B,H,W,3] in 0..1 -> hint latents [B,4,h,w] (float32, CPU) for a (h, w) latent generation.

    As the reference app (PixArt-alpha app/app_controlnet.py): fitted to the generation's size, mapped to [-1, 1],
    VAE-encoded and multiplied by the VAE's scaling factor. The reference draws a posterior sample; with a
    `generator` so does this, without one it takes the posterior mean (deterministic)."""
    p = next(vae.parameters())
    h, w = latent_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    x = fit_image(images.movedim(-1, 1).float(), h * factor, w * factor)  # [B, 3, 8h, 8w] in 0..1
    x = (x * 2 - 1).to(device=device or p.device, dtype=p.dtype)
    dist = vae.encode(x).latent_dist
    latents = dist.mode() if generator is None else dist.sample(generator)  # [B, 4, h, w]
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"ControlNet hint: VAE scaling factor {scale} is not a positive number.")
    return (latents * scale).float().cpu()

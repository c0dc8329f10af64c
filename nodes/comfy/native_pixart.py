"""Our DiT as a ComfyUI MODEL: ComfyUI's own PixArt classes (comfy.model_base.PixArt around
comfy.ldm.pixart.pixartms.PixArtMS) built on our weights, so KSampler, SamplerCustomAdvanced and ComfyUI's LoRA
loaders work on it."""
from __future__ import annotations

import functools
import logging
import weakref

import torch

import comfy.ldm.pixart.pixartms
import comfy.model_base
import comfy.supported_models

from ...pixart_core import transformer as core_dit
from ...pixart_core.meta import empty_weights
from ..types import DiTHandle
from . import loading, patches
from ...pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))

AT_LIMIT_KEY = "pixart_at_limit"  # CONDITIONING extra: {token limit: embeddings encoded at that limit}


class PixArtMS(comfy.ldm.pixart.pixartms.PixArtMS):
    """ComfyUI's PixArt network with diffusers' position embedding: the table of the checkpoint's trained grid
    (base_size, pe_interpolation) stretched over any size, as our sampler and diffusers compute it. ComfyUI's own
    guesses pe_interpolation as round(side/64), which is 0 below ~256 px (Σ-256 then divides by zero) and differs
    for α-256 (trained with interpolation 1)."""

    def __init__(self, pe_base_size: int, pe_scale: float, **kwargs):
        super().__init__(**kwargs)
        self.pe_base_size, self.pe_scale = pe_base_size, pe_scale

    def forward_orig(self, x, timestep, y, mask=None, c_size=None, c_ar=None, **kwargs):
        B, C, H, W = x.shape  # latents [B, 4, h, w]
        p = self.patch_size
        pos = core_dit.position_embedding(self.hidden_size, H // p, W // p, self.pe_base_size, self.pe_scale, x.device)
        x = (self.x_embedder(x) + pos).to(x.dtype)  # [B, h*w/p², D], added in fp32 as diffusers does
        t = self.t_embedder(timestep, x.dtype)  # [B, D]
        if self.micro_conditioning and c_size is not None and c_ar is not None:
            t = t + torch.cat([self.csize_embedder(c_size, B), self.ar_embedder(c_ar, B)], dim=1)
        t0 = self.t_block(t)  # [B, 6D]
        y = self.y_embedder(y, self.training).squeeze(1).view(1, -1, x.shape[-1])  # every token real: no mask
        for block in self.blocks:
            x = block(x, y, t0, None, (H, W), **kwargs)
        x = self.final_layer(x, t)  # [B, h*w/p², p²·out]
        return self.unpatchify(x, H, W)  # [B, out, H, W]


class BridgedPixArt(comfy.model_base.PixArt):
    """ComfyUI's PixArt model (so ComfyUI's LoRA key map and every model patch apply) around our network, reading
    the conditioning encoded at its own token limit when the bridge carries one.

    It shares its weights with our DiT (`dit`, weakly held). A move gives whichever side moved new tensors (a GPU
    round trip ends in fresh copies in system memory), so after each whole move of either (ComfyUI's load with
    every layer, its unload) the DiT's tensors are pointed at the MODEL's again wherever both are on one device
    with the same values: one copy in system memory. ComfyUI's partial unloads move single layers; those are
    shared again at the next whole move."""

    def __init__(self, model_config, max_tokens: int, device=None):
        comfy.model_base.BaseModel.__init__(self, model_config, device=device, unet_model=PixArtMS)
        self.max_tokens = max_tokens
        self.dit: weakref.ref | None = None

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.share_with_dit()
        return self

    def share_with_dit(self) -> int:
        """Point the DiT's weights at this MODEL's where they are equal and on one device; returns the bytes freed."""
        dit = self.dit() if self.dit is not None else None
        return 0 if dit is None else core_dit.share_weights(dit, self.diffusion_model.state_dict())

    def extra_conds(self, **kwargs):
        at = kwargs.get(AT_LIMIT_KEY) or {}
        cross = kwargs.get("cross_attn")
        if cross is not None and cross.shape[1] > self.max_tokens and self.max_tokens in at:
            kwargs["cross_attn"] = at[self.max_tokens]
        return super().extra_conds(**kwargs)


def unet_config(dit: torch.nn.Module, variant) -> dict:
    """ComfyUI's PixArtMS arguments for our diffusers model (set from its config, never guessed)."""
    c = dit.config
    return {
        "image_model": f"pixart_{variant.family}",
        "input_size": c.sample_size,  # latent side of the trained size (unused by the forward)
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "hidden_size": c.num_attention_heads * c.attention_head_dim,
        "depth": c.num_layers,
        "num_heads": c.num_attention_heads,
        "caption_channels": c.caption_channels,
        "pred_sigma": c.out_channels == 2 * c.in_channels,
        "learn_sigma": c.out_channels == 2 * c.in_channels,
        "micro_condition": bool(dit.use_additional_conditions),
        "model_max_length": variant.max_tokens,
        "pe_interpolation": float(dit.pos_embed.interpolation_scale),
        "pe_base_size": int(dit.pos_embed.base_size),
        "pe_scale": float(dit.pos_embed.interpolation_scale),
    }


def _share_after_move(model: weakref.ref) -> None:
    """After our DiT moved: its weights back in the bridged MODEL's tensors where they are equal (one copy)."""
    bridged = model()
    if bridged is not None:
        bridged.share_with_dit()


def to_model(handle: DiTHandle):
    """A ComfyUI MODEL (ModelPatcher around BridgedPixArt) holding the DiT's weights: the same tensors, fused q/k/v
    shared with the DiT's split ones; nothing is copied."""
    patcher = handle.patcher
    loading.unload(patcher)  # its original (unpatched) weights, on the offload device
    dit = patcher.model.inner
    config = unet_config(dit, handle.variant)
    family = comfy.supported_models.PixArtAlpha if handle.variant.family == "alpha" else comfy.supported_models.PixArtSigma
    model_config = family(config)
    model_config.set_inference_dtype(dit.dtype, None)
    with empty_weights():
        model = BridgedPixArt(model_config, handle.variant.max_tokens, device=patcher.offload_device)
    original = core_dit.to_original(dit.state_dict(), handle.variant.max_tokens)
    model.diffusion_model.load_state_dict(original, strict=True, assign=True)
    model.diffusion_model.requires_grad_(False)
    model.dit = weakref.ref(dit)
    saved = core_dit.share_weights(dit, original)
    patcher.model.after_move = functools.partial(_share_after_move, weakref.ref(model))
    log.info("PixArt DiT -> MODEL: %s (%s) as ComfyUI's PixArt, %d blocks; %.0f MiB shared with the DiT instead of copied",
             handle.name, handle.variant.name, config["depth"], saved / 2**20)
    out = loading.wrap_comfy_model(model, patcher.load_device, patcher.offload_device)
    if patcher.patches:  # PixArt-Σ LoRA Loader's patches come along, on the fused rows where the DiT's are split
        shapes = patches.param_shapes(patcher)
        carried = patches.carry_weight_patches(
            patcher, out, lambda key: core_dit.original_target(key, shapes[key][0]))
        log.info("PixArt DiT -> MODEL: %d LoRA-patched weights carried over", carried)
    return out

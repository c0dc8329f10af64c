"""Bridges into ComfyUI's own types: our DiT as a ComfyUI MODEL (ComfyUI's native PixArt class, built from our
weights), our T5 conditioning as a ComfyUI CONDITIONING. KSampler, SamplerCustomAdvanced and the core LoRA loaders
then work on PixArt models from this pack's loaders."""
from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io

import comfy.ldm.pixart.pixartms
import comfy.model_base
import comfy.supported_models

from ..pixart_core import transformer as core_dit
from ..pixart_core.meta import empty_weights
from ..pixart_core.conditioning import Conditioning
from . import management
from .types import CATEGORY, ConditioningType, DiT, DiTHandle

log = logging.getLogger(__name__)

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
    the conditioning encoded at its own token limit when the bridge carries one."""

    def __init__(self, model_config, max_tokens: int, device=None):
        comfy.model_base.BaseModel.__init__(self, model_config, device=device, unet_model=PixArtMS)
        self.max_tokens = max_tokens

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


def to_model(handle: DiTHandle):
    """A ComfyUI MODEL (ModelPatcher around BridgedPixArt) holding the DiT's weights: the same tensors, fused q/k/v
    shared with the DiT's split ones; nothing is copied."""
    patcher = handle.patcher
    management.unload(patcher)  # its original (unpatched) weights, on the offload device
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
    saved = core_dit.share_fused(dit, original)
    log.info("PixArt DiT -> MODEL: %s (%s) as ComfyUI's PixArt, %d blocks; %.0f MiB shared with the DiT instead of copied",
             handle.name, handle.variant.name, config["depth"], saved / 2**20)
    out = management.wrap_comfy_model(model, patcher.load_device, patcher.offload_device)
    if patcher.patches:  # PixArt-Σ LoRA Loader's patches come along, on the fused rows where the DiT's are split
        shapes = management.param_shapes(patcher)
        carried = management.carry_weight_patches(
            patcher, out, lambda key: core_dit.original_target(key, shapes[key][0]))
        log.info("PixArt DiT -> MODEL: %d LoRA-patched weights carried over", carried)
    return out


def to_conditioning(c: Conditioning) -> list:
    """Our conditioning as ComfyUI's: the real tokens only (masked padding is dropped: with the mask applied it
    changes nothing, and ComfyUI's PixArt takes no mask), plus the encodings at smaller token limits."""
    def real(x: Conditioning) -> torch.Tensor:
        if x.mask.shape[0] != 1:
            raise ValueError(f"PixArt-Σ Conditioning → CONDITIONING: expected one prompt, got {x.mask.shape[0]}.")
        keep = x.mask[0].bool()
        if not keep.any():
            raise ValueError("PixArt-Σ Conditioning → CONDITIONING: the attention mask has no real token; "
                             "re-encode the prompt with PixArt-Σ Text Encode.")
        return x.embeds[:, keep]

    extra = {AT_LIMIT_KEY: {limit: real(sub) for limit, sub in c.at_limit.items()}} if c.at_limit else {}
    return [[real(c), extra]]


class DiTToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaDiTToModel",
            display_name="PixArt-Σ DiT → MODEL",
            category=f"{CATEGORY}/bridge",
            description="Makes the PixArt DiT a ComfyUI MODEL (ComfyUI's own PixArt class, with this DiT's weights and "
                        "variant) for KSampler, SamplerCustomAdvanced and the LoRA loaders.",
            inputs=[DiT.Input("dit", tooltip="The transformer from PixArt-Σ DiT Loader (any variant, incl. Σ-256 and 2K).")],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle) -> io.NodeOutput:
        return io.NodeOutput(to_model(dit))


class ConditioningToComfy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaConditioningToComfy",
            display_name="PixArt-Σ Conditioning → CONDITIONING",
            category=f"{CATEGORY}/bridge",
            description="Makes PixArt-Σ Text Encode's conditioning a ComfyUI CONDITIONING (the real T5 tokens) for "
                        "KSampler with PixArt-Σ DiT → MODEL or ComfyUI's own PixArt model.",
            inputs=[ConditioningType.Input("conditioning", tooltip="positive or negative from PixArt-Σ Text Encode.")],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, conditioning: Conditioning) -> io.NodeOutput:
        return io.NodeOutput(to_conditioning(conditioning))

"""Bridge nodes into ComfyUI's own types: our DiT as a ComfyUI MODEL (ComfyUI's native PixArt class, built from our
weights: comfy/native_pixart.py), our T5 conditioning as a ComfyUI CONDITIONING. KSampler, SamplerCustomAdvanced and
the core LoRA loaders then work on PixArt models from this pack's loaders."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..pixart_core.conditioning import Conditioning
from .comfy.native_pixart import AT_LIMIT_KEY, to_model
from .search_aliases import search_aliases
from .types import CATEGORY, ConditioningType, DiT, DiTHandle


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
                        "variant) for KSampler, SamplerCustomAdvanced and the LoRA loaders. A DiT with ControlNets "
                        "applied is refused: ComfyUI's PixArt has no ControlNet hook (use the PixArt-Σ samplers).",
            **search_aliases("pixart sigma dit to model", "ksampler", "model bridge"),
            inputs=[DiT.Input("dit", tooltip="The transformer from PixArt-Σ DiT Loader (any variant, incl. Σ-256 and 2K).")],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A ComfyUI MODEL for KSampler, "
                                                                  "SamplerCustomAdvanced and LoraLoaderModelOnly.")],
        )

    @classmethod
    def execute(cls, dit: DiTHandle) -> io.NodeOutput:
        if dit.controls:
            # ComfyUI's PixArt forward drops transformer_options and the `control` input its samplers pass: a MODEL
            # made from this DiT would silently sample without the ControlNets.
            names = ", ".join(c.controlnet.name for c in dit.controls)
            raise ValueError(
                f"PixArt-Σ DiT → MODEL: this DiT has ControlNets applied ({names}), which ComfyUI's samplers cannot "
                "run: ComfyUI's PixArt model has no ControlNet hook. Sample the controlled DiT with PixArt-Σ Sampler "
                "or PixArt-Σ Sampler (Advanced) (Tiled Refine for tiles), or connect DiT → MODEL to the DiT before "
                "PixArt-Σ ControlNet Apply.")
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
            **search_aliases("pixart sigma conditioning to conditioning", "ksampler", "conditioning bridge"),
            inputs=[ConditioningType.Input("conditioning", tooltip="positive or negative from PixArt-Σ Text Encode.")],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING",
                                            tooltip="A ComfyUI CONDITIONING (the prompt's real T5 tokens) for "
                                                    "KSampler's positive or negative.")],
        )

    @classmethod
    def execute(cls, conditioning: Conditioning) -> io.NodeOutput:
        return io.NodeOutput(to_conditioning(conditioning))

"""A T5-XXL that the user already loaded with ComfyUI's own loaders, as a source for PixArt-Σ Text Encode.

CLIPLoader (type sd3 or pixart), DualCLIPLoader (sd3, flux, ...) and GGUF CLIP loaders that build ComfyUI's T5
module all give a `CLIP` whose `cond_stage_model` holds a `t5xxl` (ComfyUI's `SDClipModel` around
`comfy.text_encoders.t5.T5`). We drive that module with this pack's tokenization, truncation and attention mask,
so the embeddings are the ones PixArt-Σ T5 Loader gives for the same weights, and ComfyUI keeps managing the model
(its patcher loads it, applies LoRA patches, offloads it).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import types
import uuid
from typing import Callable

import torch

from ..pixart_core import t5 as core_t5
from ..pixart_core import t5_spec
from . import management, paths

log = logging.getLogger(__name__)

# What ComfyUI's text encoder models call their parts, for messages about a CLIP without a T5-XXL.
_PART_NAMES = {
    "clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "CLIP-H", "t5base": "T5-base", "t5xl": "T5-XL",
    "umt5xxl": "umT5-XXL", "llama": "Llama", "gemma": "Gemma", "qwen25_7b": "Qwen2.5", "mt5xl": "mT5-XL",
    "byt5_small": "ByT5",
}
_IDENTITY_ATTR = "_pixart_sigma_identity"


class ComfyT5(torch.nn.Module):
    """ComfyUI's T5 module behind the call our encoder makes on a transformers T5EncoderModel:
    `model(input_ids=..., attention_mask=...).last_hidden_state`."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        # An all-ones mask changes nothing; ComfyUI's T5 then takes its unmasked attention, as its own encode does.
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        # As ComfyUI's SDClipModel.forward: embeddings out in float32, the layers cast their weights to it.
        hidden, _ = self.transformer(input_ids, mask, dtype=torch.float32)
        return types.SimpleNamespace(last_hidden_state=hidden)


def _t5_part(cond_stage_model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(name, ComfyUI T5 module) of the model's T5 part, or None."""
    from comfy.text_encoders.t5 import T5

    for name, child in cond_stage_model.named_children():
        transformer = getattr(child, "transformer", None)
        if isinstance(transformer, T5):
            return name, transformer
    return None


def _describe(cond_stage_model: torch.nn.Module) -> str:
    parts = [_PART_NAMES.get(n, n) for n, c in cond_stage_model.named_children() if c is not None]
    return " + ".join(parts) if parts else type(cond_stage_model).__name__


def find_t5(clip) -> torch.nn.Module:
    """The T5-v1.1-XXL module inside a ComfyUI CLIP, or a clear error saying what the CLIP holds instead."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None or not hasattr(clip, "patcher"):
        raise TypeError(f"PixArt-Σ Text Encode: the t5 input is a {type(clip).__name__}, neither a PixArt-Σ T5 "
                        "Loader output nor a ComfyUI CLIP.")
    hint = ("PixArt needs T5-v1.1-XXL: load t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors) with "
            "CLIPLoader type 'sd3' or 'pixart', or use PixArt-Σ T5 Loader.")
    found = _t5_part(model)
    if found is None:
        raise ValueError(f"PixArt-Σ Text Encode: this CLIP holds {_describe(model)}, no T5-XXL. {hint}")
    name, transformer = found
    blocks = transformer.encoder.block
    if len(blocks) > 1 and blocks[1].layer[0].SelfAttention.relative_attention_bias is not None:
        raise ValueError(f"PixArt-Σ Text Encode: this CLIP holds a umT5 encoder ({_describe(model)}; a relative "
                         f"position bias in every layer), not T5-v1.1-XXL. {hint}")
    vocab, width = transformer.shared.weight.shape
    if vocab != t5_spec.REAL_VOCAB:
        what = "a umT5 encoder" if vocab == 256384 else f"a T5 with a {vocab}-token vocabulary"
        raise ValueError(f"PixArt-Σ Text Encode: this CLIP holds {what} ({name}); PixArt needs T5-v1.1-XXL's "
                         f"{t5_spec.REAL_VOCAB} tokens. {hint}")
    if width != t5_spec.REAL_WIDTH:
        log.warning("PixArt-Σ Text Encode: the CLIP's T5 is %d wide, not T5-v1.1-XXL's %d: the DiT's caption "
                    "projection must match it.", width, t5_spec.REAL_WIDTH)
    return transformer


@functools.cache
def _tokenizer():
    return core_t5.load_tokenizer([paths.COMFY_TOKENIZER])


@dataclasses.dataclass
class Source:
    """What Text Encode needs from its t5 input: the embedding cache identity, a tokenizer, and a loader that
    returns the encoder ready to run with the device to run it on."""

    identity: tuple
    tokenizer: object
    load: Callable[[], tuple[core_t5.LoadedT5, torch.device]]


def source(clip) -> Source:
    """A ComfyUI CLIP as Text Encode's T5 (checked at once, before anything is loaded)."""
    transformer = find_t5(clip)
    model = clip.cond_stage_model
    # The embedding cache must never mix two CLIPs: each model object gets its own id (a reloaded file is a new
    # object), and its patches (ComfyUI's LoraLoader on the CLIP) change patches_uuid.
    if getattr(model, _IDENTITY_ATTR, None) is None:
        setattr(model, _IDENTITY_ATTR, uuid.uuid4().hex)
    identity = ("comfyui-clip", getattr(model, _IDENTITY_ATTR), str(clip.patcher.patches_uuid))

    def load() -> tuple[core_t5.LoadedT5, torch.device]:
        management.use_clip(clip.patcher)
        # Inputs go where ComfyUI's own T5 encode puts them: the embedding weight's device.
        device = transformer.get_input_embeddings().weight.device
        return core_t5.LoadedT5(ComfyT5(transformer), torch.float32, "ComfyUI CLIP", "CLIP"), device

    return Source(identity, _tokenizer(), load)

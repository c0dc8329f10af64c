"""ComfyUI's CLIP from the inside: finding the T5 part in its text model, driving ComfyUI's T5 module with a
transformers-style call, loading it through the CLIP's patcher, and an identity for the embedding cache."""
from __future__ import annotations

import types
import uuid

import torch

from .loading import use_clip

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


def text_model(clip) -> torch.nn.Module | None:
    """A ComfyUI CLIP's text model (`cond_stage_model`), or None when `clip` is no CLIP."""
    model = getattr(clip, "cond_stage_model", None)
    return None if model is None or not hasattr(clip, "patcher") else model


def t5_part(cond_stage_model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(name, ComfyUI T5 module) of the model's T5 part, or None."""
    from comfy.text_encoders.t5 import T5

    for name, child in cond_stage_model.named_children():
        transformer = getattr(child, "transformer", None)
        if isinstance(transformer, T5):
            return name, transformer
    return None


def describe(cond_stage_model: torch.nn.Module) -> str:
    """The text model's parts in words (e.g. "CLIP-L + T5-XL")."""
    parts = [_PART_NAMES.get(n, n) for n, c in cond_stage_model.named_children() if c is not None]
    return " + ".join(parts) if parts else type(cond_stage_model).__name__


def relative_bias_per_layer(transformer: torch.nn.Module) -> bool:
    """Whether the T5 module has a relative position bias in every layer (umT5), not only in the first (T5 v1.1)."""
    blocks = transformer.encoder.block
    return len(blocks) > 1 and blocks[1].layer[0].SelfAttention.relative_attention_bias is not None


def vocab_and_width(transformer: torch.nn.Module) -> tuple[int, int]:
    """The T5 module's vocabulary size and width (its token embedding's shape)."""
    vocab, width = transformer.shared.weight.shape
    return vocab, width


def identity(clip) -> tuple:
    """What the embedding cache knows a CLIP by. It must never mix two CLIPs: each text model object gets its own
    id (a reloaded file is a new object), and its patches (ComfyUI's LoraLoader on the CLIP) change patches_uuid."""
    model = clip.cond_stage_model
    if getattr(model, _IDENTITY_ATTR, None) is None:
        setattr(model, _IDENTITY_ATTR, uuid.uuid4().hex)
    return "comfyui-clip", getattr(model, _IDENTITY_ATTR), str(clip.patcher.patches_uuid)


def load(clip, transformer: torch.nn.Module) -> torch.device:
    """Load the CLIP through its patcher (as ComfyUI's own text encode does) and return where inputs go: the
    embedding weight's device, as ComfyUI's own T5 encode puts them."""
    use_clip(clip.patcher)
    return transformer.get_input_embeddings().weight.device

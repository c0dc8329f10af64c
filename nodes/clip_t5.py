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
from typing import Callable

import torch

from ..pixart_core import t5 as core_t5
from ..pixart_core import t5_spec
from .comfy import clip as comfy_clip
from .comfy import paths
from .comfy.clip import ComfyT5
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))

def find_t5(clip) -> torch.nn.Module:
    """The T5-v1.1-XXL module inside a ComfyUI CLIP, or a clear error saying what the CLIP holds instead."""
    model = comfy_clip.text_model(clip)
    if model is None:
        raise TypeError(f"PixArt-Σ Text Encode: the t5 input is a {type(clip).__name__}, neither a PixArt-Σ T5 "
                        "Loader output nor a ComfyUI CLIP.")
    hint = ("PixArt needs T5-v1.1-XXL: load t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors) with "
            "CLIPLoader type 'sd3' or 'pixart', or use PixArt-Σ T5 Loader.")
    found = comfy_clip.t5_part(model)
    if found is None:
        raise ValueError(f"PixArt-Σ Text Encode: this CLIP holds {comfy_clip.describe(model)}, no T5-XXL. {hint}")
    name, transformer = found
    if comfy_clip.relative_bias_per_layer(transformer):
        raise ValueError(f"PixArt-Σ Text Encode: this CLIP holds a umT5 encoder ({comfy_clip.describe(model)}; a "
                         f"relative position bias in every layer), not T5-v1.1-XXL. {hint}")
    vocab, width = comfy_clip.vocab_and_width(transformer)
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
    identity = comfy_clip.identity(clip)  # the embedding cache never mixes two CLIPs

    def load() -> tuple[core_t5.LoadedT5, torch.device]:
        device = comfy_clip.load(clip, transformer)
        return core_t5.LoadedT5(ComfyT5(transformer)), device

    return Source(identity, _tokenizer(), load)

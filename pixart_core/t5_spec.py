"""What every T5 loader shares: the T5-v1.1 encoder's key layout and config, the quantization modes and their
bitsandbytes config, and the folder layout. A leaf: it imports none of t5, t5_cache, t5_quantize or gguf_t5.

Key layout: a T5 file names its tensors as transformers' T5EncoderModel does (`shared.weight`,
`encoder.block.N...`), possibly under a prefix (ComfyUI's `text_encoders.t5xxl.transformer.`), possibly with the
embedding under `encoder.embed_tokens.weight` only, possibly with a decoder beside the encoder. `encoder_prefix` and
`model_keys` bring any of these to the model's names.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import torch

from . import files
from .logs import logger_name
from .meta import empty_weights

log = logging.getLogger(logger_name(__name__))

REAL_VOCAB, REAL_WIDTH = 32128, 4096
ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"  # present in every T5 encoder, whatever the prefix
EMBEDDING = "shared.weight"
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"  # the same tensor (transformers ties them); files hold one or both

# Quantization modes (ids; the loader node shows its own labels for them). The cache's entry folders are named by
# these ids too.
QUANT_NONE = "none"
QUANT_8BIT = "8bit"  # bitsandbytes LLM.int8 (transformers: load_in_8bit)
QUANT_NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat, block 64, no double quantization (load_in_4bit)
QUANTIZATIONS = (QUANT_NONE, QUANT_8BIT, QUANT_NF4)
BNB_INSTALL_HINT = (
    "bitsandbytes is not installed, so quantized T5 modes are unavailable. Install it into ComfyUI's Python with "
    "`python -m pip install \"bitsandbytes>=0.48\"`, restart ComfyUI, or choose quantization 'none'."
)
NOT_T5 = "Choose a T5-v1.1-XXL file (e.g. t5xxl_fp16.safetensors) in models/text_encoders."

V = TypeVar("V")


def bnb_config(quantization: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for a quantized mode (nf4 computes in `dtype`); a RuntimeError saying how
    to install bitsandbytes when it is missing. This is where bitsandbytes is first imported."""
    if quantization not in (QUANT_8BIT, QUANT_NF4):
        raise ValueError(f"T5 quantization {quantization!r} is not one of {QUANTIZATIONS}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(BNB_INSTALL_HINT) from e
    from transformers import BitsAndBytesConfig

    if quantization == QUANT_8BIT:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
    )


def weights_folder(path: Path) -> Path:
    """The folder holding a T5's config.json: a diffusers pipeline's text_encoder/ or the folder itself."""
    return files.component_folder(path, "text_encoder", "transformers/diffusers T5")


def encoder_prefix(keys) -> str | None:
    """What stands before `encoder.` in a T5 file's keys ('' for transformers' own names), or None: no T5 encoder."""
    anchor = next((k for k in keys if k.endswith(ANCHOR)), None)
    return None if anchor is None else anchor[: len(anchor) - len(ANCHOR)]


def model_keys(tensors: dict[str, V], prefix: str) -> dict[str, V]:
    """`tensors` (anything keyed by a file's names) under T5EncoderModel's names: the prefix removed, keys of other
    parts (a decoder, an LM head) dropped, and the embedding once, as `shared.weight`. A file with both names gives
    the encoder's own (`encoder.embed_tokens.weight`): the one transformers' encoder reads, as it leaves the two untied
    when they differ."""
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out = {k: v for k, v in out.items() if k.startswith("encoder.") or k == EMBEDDING}
    alias = out.pop(EMBEDDING_ALIAS, None)
    if alias is not None:
        out[EMBEDDING] = alias
    return out


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a T5EncoderModel with this config, under model_keys' names (built on the meta device)."""
    from transformers import T5EncoderModel

    with empty_weights():
        skeleton = T5EncoderModel(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if k != EMBEDDING_ALIAS}


def check_against(name: str, shapes: dict[str, tuple[int, ...]], config) -> None:
    """The keys and shapes of a T5 file (model_keys' names) checked against the model its config builds."""
    expected = expected_shapes(config)
    files.check_keys(name, shapes, expected, "a T5-v1.1 encoder")
    files.check_shapes(name, shapes, expected, "a T5-v1.1 encoder")


def config_from_shapes(shapes: dict[str, tuple[int, ...]], name: str):
    """The T5Config a T5-v1.1 encoder's tensor shapes imply (width, depth, heads, vocab), or a clear error."""
    from transformers import T5Config

    emb = shapes.get(EMBEDDING, shapes.get(EMBEDDING_ALIAS))
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = shapes.get(ANCHOR)
    if emb is None or bias is None or q is None:
        raise files.WeightFileError(f"{name}: this is not a T5 encoder; it looks like "
                                    f"{files.describe(shapes, shapes)}. {NOT_T5}")
    vocab, d_model = emb
    if vocab == 256384:
        raise files.WeightFileError(
            f"{name}: this is a umT5 encoder (256384-token vocabulary); PixArt needs T5-v1.1-XXL (32128 tokens), "
            "e.g. t5xxl_fp16.safetensors."
        )
    wi = shapes.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if wi is None:
        raise files.WeightFileError(
            f"{name}: this is an original T5 (no gated feed-forward), not T5-v1.1; PixArt needs T5-v1.1-XXL."
        )
    if vocab != REAL_VOCAB:
        raise files.WeightFileError(
            f"{name}: a T5 with a {vocab}-token vocabulary; PixArt needs T5-v1.1-XXL's {REAL_VOCAB} tokens."
        )
    if d_model != REAL_WIDTH:
        log.warning("%s: T5 width %d, not T5-v1.1-XXL's %d: the DiT's caption projection must match it.", name, d_model, REAL_WIDTH)
    heads = bias[1]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=q[0] // heads,
        d_ff=wi[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=bias[0],
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        architectures=["T5EncoderModel"],
    )

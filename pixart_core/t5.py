"""T5-v1.1 encoder: config from a state dict, loading (optionally bitsandbytes-quantized), tokenizer, encoding."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from . import captions, dtypes, files, gguf_t5, quant, t5_formats
from .meta import empty_weights
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

QUANTIZATIONS = ("none", "8-bit (bitsandbytes)", "4-bit nf4 (bitsandbytes)")
DTYPES = ("auto", "bf16", "fp32")
REAL_VOCAB, REAL_WIDTH = 32128, 4096
_ANCHOR = "block.0.layer.0.SelfAttention.q.weight"
BNB_INSTALL_HINT = (
    "bitsandbytes is not installed, so quantized T5 modes are unavailable. Install it into ComfyUI's Python with "
    "`python -m pip install \"bitsandbytes>=0.48\"`, restart ComfyUI, or choose quantization 'none'."
)


@dataclasses.dataclass
class LoadedT5:
    """A loaded T5 encoder and what the encoder node needs to use it."""

    model: torch.nn.Module  # transformers T5EncoderModel
    compute_dtype: torch.dtype
    quantization: str
    source: str
    cache: object | None = None  # t5_cache.Outcome where the quantized-T5 cache was used


def compute_dtype(choice: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """The T5 compute dtype (`auto`: what "auto" is on the load device): never float16 (T5-XXL overflows in fp16)."""
    return dtypes.pick(choice, auto, "T5", DTYPES, fp16_ok=False)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], name: str):
    """The T5Config a T5-v1.1 encoder's tensor shapes imply (width, depth, heads, vocab), or a clear error."""
    from transformers import T5Config

    emb = shapes.get("shared.weight", shapes.get("encoder.embed_tokens.weight"))
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if emb is None or bias is None or q is None:
        raise files.WeightFileError(
            f"{name}: this is not a T5 encoder; it looks like {files.describe(shapes, shapes)}. "
            "Choose a T5-v1.1-XXL file (e.g. t5xxl_fp16.safetensors) in models/text_encoders."
        )
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


def _bnb_config(quantization: str, dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(BNB_INSTALL_HINT) from e
    from transformers import BitsAndBytesConfig

    if quantization == QUANTIZATIONS[1]:
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == QUANTIZATIONS[2]:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
        )
    raise ValueError(f"T5 quantization {quantization!r} is not one of {QUANTIZATIONS}.")


def folder_weights_dir(path: Path) -> Path:
    """The folder holding a T5's config.json: a diffusers pipeline's text_encoder/ or the folder itself."""
    return files.component_folder(path, "text_encoder", "transformers/diffusers T5")


def load_t5(path: str | os.PathLike, quantization: str, dtype: torch.dtype, *, cache_dir: str | os.PathLike | None = None,
            quantize_device: torch.device | None = None) -> LoadedT5:
    """Load a T5-v1.1 encoder from a single safetensors file (plain, or ComfyUI's scaled fp8), a GGUF file or a
    transformers/diffusers folder, on the CPU.

    Weights stream from the memory-mapped file tensor by tensor (transformers' loader), converted to `dtype`
    or quantized as they arrive, so the whole model never sits in memory twice. With `cache_dir`, an 8-bit/nf4
    T5 is quantized once and read from the cache afterwards (t5_cache); `quantize_device` (a CUDA GPU) then
    quantizes it there tensor by tensor.
    """
    path = Path(path)
    if gguf_t5.is_gguf(path):  # already quantized: its linear weights stay so, dequantized per layer at forward
        if quantization != QUANTIZATIONS[0]:
            raise ValueError(f"{path.name}: quantization {quantization!r} on a GGUF file. {gguf_t5.QUANTIZATION_HINT}")
        return LoadedT5(gguf_t5.load(path, dtype, config_from_shapes), dtype, quantization, str(path))
    if cache_dir is not None and quantization != QUANTIZATIONS[0]:
        from . import t5_cache

        _bnb_config(quantization, dtype)  # without bitsandbytes: say how to install it before anything else

        model, outcome = t5_cache.load(
            path, quantization, dtype, Path(cache_dir), fresh=lambda: load_t5(path, quantization, dtype),
            from_folder=lambda d: _from_pretrained(d, path.name, dtype, None, None, cpu=True),
            quantize_device=quantize_device)
        return LoadedT5(model, dtype, quantization, str(path), outcome)
    qconfig = None if quantization == QUANTIZATIONS[0] else _bnb_config(quantization, dtype)
    if path.is_dir():
        wdir = folder_weights_dir(path)
        files.check_folder(wdir)
        cfg = json.loads((wdir / "config.json").read_text())
        if "t5" not in str(cfg.get("model_type", "")).lower():
            raise files.WeightFileError(
                f"{wdir}: config.json describes a {cfg.get('model_type', 'unknown')!r} model, not a T5 encoder."
            )
        return LoadedT5(_from_pretrained(wdir, wdir.name, dtype, qconfig, None), dtype, quantization, str(path))

    shapes = files.read_shapes(path)
    anchor = next((k for k in shapes if k.endswith(_ANCHOR)), None)
    if anchor is None:
        raise files.WeightFileError(
            f"{path.name}: this is not a T5 encoder; it looks like {files.describe(shapes, shapes)}. "
            "Choose a T5-v1.1-XXL file (e.g. t5xxl_fp16.safetensors) in models/text_encoders."
        )
    scaled = t5_formats.scaled_keys(shapes)  # ComfyUI's scaled fp8: weights dequantized with their scales
    prefix = anchor[: len(anchor) - len(_ANCHOR) - len("encoder.")]
    shapes = {k: v for k, v in shapes.items() if k not in scaled}
    shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    config = config_from_shapes(shapes, path.name)
    from transformers import T5EncoderModel

    with empty_weights():
        skeleton = T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    got = {k: v for k, v in shapes.items() if k.startswith("encoder.") or k == "shared.weight"}
    if "shared.weight" not in got and "encoder.embed_tokens.weight" in got:
        got["shared.weight"] = got["encoder.embed_tokens.weight"]
    got.setdefault("encoder.embed_tokens.weight", got.get("shared.weight"))
    files.check_keys(path.name, got, expected, "a T5-v1.1 encoder")
    files.check_shapes(path.name, got, expected, "a T5-v1.1 encoder")
    if scaled:
        return LoadedT5(t5_formats.load_scaled_fp8(path, prefix, config, dtype, qconfig), dtype, quantization, str(path))
    # transformers streams a folder's model.safetensors; give it one that points at the user's file.
    with tempfile.TemporaryDirectory(prefix="pixart_t5_") as tmp:
        config.save_pretrained(tmp)
        os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
        mapping = {f"^{re.escape(prefix)}": ""} if prefix else None
        model = _from_pretrained(Path(tmp), path.name, dtype, qconfig, mapping)
    return LoadedT5(model, dtype, quantization, str(path))


def _from_pretrained(folder: Path, name: str, dtype: torch.dtype, qconfig, key_mapping, cpu: bool = False):
    from transformers import T5EncoderModel

    # Quantized loads (also of a pre-quantized folder: `cpu`) default to the GPU in transformers; load on the CPU so ComfyUI's model management decides
    # when the T5 goes to the GPU (and accounts for it), as for every other model.
    model, info = T5EncoderModel.from_pretrained(
        str(folder), dtype=dtype, quantization_config=qconfig, local_files_only=True, output_loading_info=True,
        key_mapping=key_mapping, device_map={"": "cpu"} if qconfig is not None or cpu else None,
    )
    missing = [k for k in info.get("missing_keys", []) if k != "encoder.embed_tokens.weight"]
    if missing:
        raise files.WeightFileError(f"{name}: weights are missing for {sorted(missing)[:4]} ({len(missing)} in all).")
    quant.single_int8_copy(model)
    return model.eval().requires_grad_(False)


def tokenizer_candidates(weights: Path) -> list[Path]:
    """Tokenizer folders that belong to these weights (a folder's tokenizer/ or the folder itself), best first."""
    return [weights / "tokenizer", weights] if weights.is_dir() else []


def load_tokenizer(candidates: list[Path]):
    """The first T5 tokenizer found in `candidates` (folders with tokenizer.json or spiece.model)."""
    from transformers import AutoTokenizer

    for d in candidates:
        if (d / "tokenizer.json").is_file() or (d / "spiece.model").is_file():
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    raise FileNotFoundError(
        "No T5 tokenizer found (looked in: " + ", ".join(str(c) for c in candidates) + "). "
        "Put tokenizer.json (from the T5-v1.1-XXL or PixArt-Sigma repository) next to the weights."
    )


def preprocess(prompt: str, cleaning: str = captions.DEFAULT_MODE) -> str:
    """The text T5 reads: the prompt after caption cleaning (captions.MODES)."""
    return captions.preprocess(prompt, cleaning)


AUTO_TOKENS = 0  # max_tokens 0: the limit comes from the DiT the conditioning reaches


def token_limits(max_tokens: int) -> list[int]:
    """The limits to encode at, longest first: every variant's limit for AUTO_TOKENS, else max_tokens alone."""
    from .variants import PRESETS

    if max_tokens == AUTO_TOKENS:
        return sorted({v.max_tokens for v in PRESETS.values()}, reverse=True)
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be 0 (from the DiT) or a token count of at least 1.")
    return [max_tokens]


def cache_key(identity: tuple, prompt: str, cleaning: str, max_tokens: int) -> tuple:
    """What an encoding depends on: the T5 (file and load settings), the cleaned text, the cleaning, the limit."""
    return (identity, preprocess(prompt, cleaning), cleaning, max_tokens)


@torch.no_grad()
def encode(
    t5: LoadedT5, tokenizer, prompt: str, max_tokens: int, device: torch.device, pad: bool = False,
    cleaning: str = captions.DEFAULT_MODE, warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 last hidden state [1, n, C] (float32) and attention mask [1, n] of a prompt, truncated to max_tokens.

    Without `pad`, n is the prompt's real token count (EOS included): padding to max_tokens, as diffusers does,
    changes nothing that the masked DiT reads (padded keys are masked out of every attention, and T5's real
    tokens never attend to pads), so it is skipped; `pad=True` gives diffusers' exact [1, max_tokens] tensors.
    A prompt longer than max_tokens keeps its first max_tokens - 1 tokens and EOS, as diffusers' tokenizer call does.
    """
    text = preprocess(prompt, cleaning)
    tok = tokenizer([text], padding="max_length" if pad else "do_not_pad", max_length=max_tokens, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    full = tokenizer([text], add_special_tokens=True, return_tensors="pt").input_ids
    if warn and full.shape[-1] > max_tokens:
        dropped = tokenizer.batch_decode(full[:, max_tokens - 1 : -1])[0]
        log.warning(
            "PixArt prompt is %d tokens; T5 takes %d, so this part was cut off: %r", full.shape[-1], max_tokens, dropped
        )
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    with quant.quiet_int8_casts():
        hidden = t5.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden.float(), mask

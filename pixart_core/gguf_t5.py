"""GGUF T5-v1.1 encoder files (city96/t5-v1_1-xxl-encoder-gguf: F16 ... Q3_K_S, of every type ComfyUI-GGUF
reads), as ComfyUI-GGUF's CLIPLoaderGGUF reads them, kept quantized in memory.

The file is read with the `gguf` package. Linear weights stay in the file's quantized blocks (a Q8_0 T5-XXL holds
~5 GB instead of 9.5 GB in bf16) inside `GGUFLinear` layers, which dequantize their weight to the input's dtype at
each forward, on the input's device (gguf_quants; `gguf.quants.dequantize` is the numpy reference the tests
compare it with). The token embedding, norms and relative attention bias are dequantized at load to the compute
dtype (the embedding is looked up, not multiplied; ComfyUI-GGUF dequantizes large T5 embeddings at load too).

Key names (llama.cpp's T5 encoder layout; ComfyUI-GGUF loader.py T5_SD_MAP): `enc.blk.N.attn_q/k/v/o`,
`attn_norm`, `attn_rel_b` (block 0), `ffn_gate` (wi_0), `ffn_up` (wi_1), `ffn_down` (wo), `ffn_norm`,
`enc.output_norm`, `token_embd`. Tensor shapes in a GGUF are stored innermost-first (ggml's ne order): reversed
they are torch's. Never imports ComfyUI.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from . import files, t5_spec
from .gguf_quants import dequantize, is_readable, supported_types
from .meta import empty_weights
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

GGUF_EXT = (".gguf",)
T5_ARCHS = ("t5encoder", "t5")
# llama.cpp names -> transformers T5 names, applied in this order (as ComfyUI-GGUF's T5_SD_MAP)
KEY_MAP = (
    ("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"), ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"), ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"), ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"), ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"), ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_norm", "layer.1.layer_norm"),
)
QUANTIZATION_HINT = (
    "A GGUF file is already quantized (its type, e.g. Q8_0, is in the file name): set quantization to 'none'. "
    "For bitsandbytes 8-bit/nf4 use t5xxl_fp16.safetensors instead."
)


def hf_key(name: str) -> str:
    """A GGUF T5 tensor name as transformers' T5EncoderModel names it."""
    for a, b in KEY_MAP:
        name = name.replace(a, b)
    return name


class GGUFLinear(torch.nn.Module):
    """A bias-free Linear whose weight stays in the GGUF's quantized blocks and is dequantized to the input's dtype
    at each forward. `weight` is None so that transformers' T5 does not cast its inputs to the raw bytes' dtype."""

    weight = None

    def __init__(self, raw: torch.Tensor, qtype: int, shape: tuple[int, int]):
        super().__init__()
        self.qweight = torch.nn.Parameter(raw, requires_grad=False)
        self.qtype, self.out_features, self.in_features = int(qtype), int(shape[0]), int(shape[1])

    def dequantized(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        raw = self.qweight if device is None else self.qweight.to(device, non_blocking=True)
        return dequantize(raw, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantized(x.dtype, x.device))  # [.., out]

    def extra_repr(self) -> str:
        import gguf

        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"type={gguf.GGMLQuantizationType(self.qtype).name}"


# ------------------------------------------------------------------------------------------------------- reading

def _string_field(reader, key: str) -> str | None:
    """A string metadata field of the GGUF (None when absent or not a string)."""
    import gguf

    field = reader.get_field(key)
    if field is None or field.types[:1] != [gguf.GGUFValueType.STRING]:
        return None
    return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")


def open_reader(path: Path):
    """gguf.GGUFReader on the file, or a clear error for a truncated or non-GGUF file."""
    import gguf

    path = files.check_file(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError, struct_error(), UnicodeDecodeError) as e:
        raise files.WeightFileError(
            f"{path.name}: cannot read this GGUF file ({type(e).__name__}: {e}). It is truncated, corrupt or not a "
            "GGUF file: download it again (city96/t5-v1_1-xxl-encoder-gguf on Hugging Face)."
        ) from e


def struct_error():
    import struct

    return struct.error


def _describe_arch(arch: str | None) -> str:
    """What a GGUF that is no T5 encoder holds, from its general.architecture: llama.cpp's names of language models
    (gguf-py MODEL_ARCH_NAMES; ComfyUI-GGUF's text encoders, loader.py TXT_ARCH_LIST) and ComfyUI-GGUF's image models
    (loader.py IMG_ARCH_LIST; no architecture, "pig" and "cow" are its compatibility mode, read by tensor names)."""
    if arch in ("llama", "qwen2", "qwen2vl", "qwen3", "qwen3vl", "gemma", "gemma2", "gemma3", "mistral3"):
        return f"a {arch} language model"
    if arch in ("flux", "sd1", "sdxl", "sd3", "aura", "hidream", "ltxv", "hyvid", "wan", "cosmos", "lumina2",
                "qwen_image"):
        return f"a {arch} diffusion model (load it with ComfyUI-GGUF's Unet Loader)"
    if arch in (None, "pig", "cow"):
        return "a stable-diffusion.cpp/ComfyUI-GGUF image model (load it with ComfyUI-GGUF's Unet Loader)"
    return f"a {arch!r} model"


def read_t5(path: str | os.PathLike) -> tuple[dict[str, tuple[int, int, torch.Tensor]], dict[str, tuple[int, ...]]]:
    """The T5 tensors of a GGUF file: {transformers key: (qtype, torch shape, raw)} and their shapes, or a clear
    error for another model, a truncated file or an unsupported tensor type."""
    import gguf

    path = Path(path)
    reader = open_reader(path)
    arch = _string_field(reader, "general.architecture")
    if arch not in T5_ARCHS:
        raise files.WeightFileError(
            f"{path.name}: this GGUF holds {_describe_arch(arch)} (general.architecture = {arch!r}), "
            "not a T5 encoder. Choose a T5-v1.1-XXL GGUF (e.g. t5-v1_1-xxl-encoder-Q8_0.gguf from "
            "city96/t5-v1_1-xxl-encoder-gguf) or a T5 safetensors file."
        )
    out: dict[str, tuple[int, tuple[int, ...], torch.Tensor]] = {}
    for t in reader.tensors:
        if t.name.startswith("dec."):
            continue  # a full encoder-decoder T5: only the encoder is used
        shape = tuple(int(v) for v in reversed([int(x) for x in t.shape]))
        qtype = int(t.tensor_type)
        if not is_readable(qtype):
            raise files.WeightFileError(
                f"{path.name}: tensor {t.name} has GGUF type {t.tensor_type.name}, which this loader does not read "
                f"(it reads {', '.join(supported_types())}). Choose a file of one of those "
                "types, e.g. t5-v1_1-xxl-encoder-Q3_K_M.gguf (city96/t5-v1_1-xxl-encoder-gguf)."
            )
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        expected_bytes = int(np.prod(shape)) // block * size
        data = np.asarray(t.data)
        if int(t.n_bytes) != expected_bytes or data.nbytes != expected_bytes or int(np.prod(shape)) % block:
            raise files.WeightFileError(
                f"{path.name}: tensor {t.name} ({t.tensor_type.name}, shape {list(shape)}) holds {data.nbytes} bytes, "
                f"expected {expected_bytes}. The file is corrupt: download it again."
            )
        if qtype == int(gguf.GGMLQuantizationType.F32):
            raw = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
        elif qtype == int(gguf.GGMLQuantizationType.F16):
            raw = torch.from_numpy(np.array(data, dtype=np.float16)).reshape(shape)
        else:
            raw = torch.from_numpy(np.array(data.view(np.uint8))).reshape(-1)  # a copy: the file is not kept open
        out[hf_key(t.name)] = (qtype, shape, raw)
    del reader
    return out, {k: v[1] for k, v in out.items()}


def load(path: str | os.PathLike, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers T5EncoderModel from a GGUF T5 file, with GGUFLinear layers (quantized weights kept) and the
    other weights in `dtype`, on the CPU."""
    from transformers import T5EncoderModel

    path = Path(path)
    tensors, shapes = read_t5(path)
    config = t5_spec.config_from_shapes(shapes, path.name)
    with empty_weights():
        model = T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != t5_spec.EMBEDDING_ALIAS}
    files.check_keys(path.name, shapes, expected, "a T5-v1.1 encoder")
    files.check_shapes(path.name, shapes, expected, "a T5-v1.1 encoder")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plain: dict[str, torch.Tensor] = {}
    for key, (qtype, shape, raw) in tensors.items():
        module = key[: -len(".weight")]
        if module in linears:
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, GGUFLinear(raw, qtype, shape))
        else:
            plain[key] = dequantize(raw, qtype, shape, dtype, chunked=True)
    plain[t5_spec.EMBEDDING_ALIAS] = plain[t5_spec.EMBEDDING]
    result = model.load_state_dict(plain, strict=False, assign=True)
    assert not result.unexpected_keys and all(k.endswith(".qweight") for k in result.missing_keys), result
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor, as from_pretrained ties them
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert not left, f"parameters left on meta: {left[:3]}"
    counts: dict[str, int] = {}
    import gguf

    for qtype, _, _ in tensors.values():
        name = gguf.GGMLQuantizationType(qtype).name
        counts[name] = counts.get(name, 0) + 1
    log.info("%s: GGUF T5 (%s), linear weights kept quantized", path.name,
             ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return model.eval().requires_grad_(False)


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in GGUF_EXT

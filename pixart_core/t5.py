"""T5-v1.1 encoder: loading (optionally bitsandbytes-quantized, quantized once into the cache), tokenizer, encoding."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import (
    captions,
    dtypes,
    files,
    gguf_t5,
    quant,
    t5_cache,
    t5_formats,
    t5_quantize,
    t5_spec,
)
from .logs import logger_name
from .meta import assign_state_dict, empty_weights

log = logging.getLogger(logger_name(__name__))

DTYPES = ("auto", "bf16", "fp32")


@dataclasses.dataclass
class LoadedT5:
    """A loaded T5 encoder and what the encoder node needs to use it."""

    model: torch.nn.Module  # transformers T5EncoderModel
    cache: Outcome | None = None  # where the quantized-T5 cache was used

    def __post_init__(self):
        one_embedding_module(self.model)


def one_embedding_module(model: torch.nn.Module) -> None:
    """Make the encoder's token embedding the same module as `shared`, as it is the same tensor (transformers ties
    only the weights): whatever walks the modules and counts each one's tensors (ComfyUI's loading, offloading
    and partial unloading) then counts the embedding once, not twice."""
    encoder = getattr(model, "encoder", None)
    shared = getattr(model, "shared", None)
    if encoder is not None and shared is not None and encoder.embed_tokens is not shared \
            and encoder.embed_tokens.weight is shared.weight:
        encoder.embed_tokens = shared


def compute_dtype(choice: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """The T5 compute dtype (`auto`: what "auto" is on the load device): never float16 (T5-XXL overflows in fp16)."""
    return dtypes.pick(choice, auto, "T5", DTYPES, fp16_ok=False)


def load_t5(path: str | os.PathLike, quantization: str, dtype: torch.dtype, *, cache_dir: str | os.PathLike | None = None,
            quantize_device: torch.device | None = None, make_room: Callable[[int], None] | None = None,
            unquantized_dtype: torch.dtype | None = None) -> LoadedT5:
    """Load a T5-v1.1 encoder from a single safetensors file (plain, or ComfyUI's scaled fp8), a GGUF file or a
    transformers/diffusers folder, on the CPU; `quantization` is one of t5_spec.QUANTIZATIONS.

    Weights stream from the memory-mapped file tensor by tensor, converted to `dtype` (a plain file without
    quantization: files.read_state_dict; otherwise transformers' loader) or quantized as they arrive, so the whole
    model never sits in memory twice. With `cache_dir`, an 8-bit/nf4
    T5 is quantized once and read from the cache afterwards (t5_cache); `quantize_device` (a CUDA GPU) then
    quantizes it there tensor by tensor, after `make_room(bytes)` was asked for the memory that takes (falling
    back to the CPU when the GPU runs out). `unquantized_dtype` (a quantized T5 only): the dtype to store the
    layers bitsandbytes leaves unquantized in, where it is narrower than `dtype` (store_unquantized).
    """
    path = Path(path)
    if gguf_t5.is_gguf(path):  # already quantized: its linear weights stay so, dequantized per layer at forward
        if quantization != t5_spec.QUANT_NONE:
            raise ValueError(f"{path.name}: quantization {quantization!r} on a GGUF file. {gguf_t5.QUANTIZATION_HINT}")
        return LoadedT5(gguf_t5.load(path, dtype))
    if quantization == t5_spec.QUANT_NONE:
        return LoadedT5(_load(path, dtype, None))
    qconfig = t5_spec.bnb_config(quantization, dtype)  # without bitsandbytes: say how to install it before anything else
    outcome = None
    if cache_dir is None:
        model = _load(path, dtype, qconfig)
    else:
        model, outcome = _load_quantized_once(path, quantization, dtype, qconfig, Path(cache_dir), quantize_device,
                                              make_room)
    if unquantized_dtype is not None:
        store_unquantized(model, unquantized_dtype)
    return LoadedT5(model, outcome)


class WideningLinear(torch.nn.Linear):
    """A Linear whose weight is stored in a narrower dtype than it computes in: input and weight are cast to
    `compute_dtype` at each forward."""

    compute_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return torch.nn.functional.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias)


def store_unquantized(model: torch.nn.Module, storage: torch.dtype) -> int:
    """Store the big weights that bitsandbytes leaves unquantized in a quantized T5 in `storage` where that is
    narrower than their dtype; returns the bytes saved.

    transformers keeps each feed-forward output layer `wo` out of quantization, in the compute dtype (T5's
    `_keep_in_fp32_modules`: int8 matmuls run in fp16, where T5-XXL's `wo` outputs overflow), and the token
    embedding is never quantized. Computing in fp32 (GPUs without bf16), they hold 4.2 of the 8-bit T5-XXL's
    7.6 GiB. Stored in bf16 (the range of fp32, as on bf16 GPUs) they take half that: each `wo` becomes a
    WideningLinear that computes in fp32 (T5 rounds its input to the weight's dtype first, as on bf16 GPUs), and
    the embedding's bf16 rows are added to the fp32 residual stream by the first block.
    """
    saved = 0
    for block in model.encoder.block:
        wo = block.layer[-1].DenseReluDense.wo
        if type(wo) is torch.nn.Linear and wo.weight.dtype.itemsize > storage.itemsize:
            compute = wo.weight.dtype
            saved += wo.weight.numel() * (compute.itemsize - storage.itemsize)
            wo.weight.data = wo.weight.data.to(storage)
            wo.__class__ = WideningLinear
            wo.compute_dtype = compute
    emb = model.get_input_embeddings().weight  # the tied embedding: one tensor
    if emb.dtype.itemsize > storage.itemsize:
        saved += emb.numel() * (emb.dtype.itemsize - storage.itemsize)
        emb.data = emb.data.to(storage)
    return saved


def _load(path: Path, dtype: torch.dtype, qconfig) -> torch.nn.Module:
    """The T5 of a folder or a safetensors file (plain or scaled fp8), quantized by transformers where `qconfig`."""
    if path.is_dir():
        wdir = t5_spec.weights_folder(path)
        files.check_folder(wdir)
        cfg = json.loads((wdir / "config.json").read_text())
        if "t5" not in str(cfg.get("model_type", "")).lower():
            raise files.WeightFileError(
                f"{wdir}: config.json describes a {cfg.get('model_type', 'unknown')!r} model, not a T5 encoder."
            )
        return _from_pretrained(wdir, wdir.name, dtype, qconfig, None)
    file_shapes = files.read_shapes(path)
    prefix = t5_spec.encoder_prefix(file_shapes)
    if prefix is None:
        raise files.WeightFileError(f"{path.name}: this is not a T5 encoder; it looks like "
                                    f"{files.describe(file_shapes, file_shapes)}. {t5_spec.NOT_T5}")
    scaled = t5_formats.scaled_keys(file_shapes)  # ComfyUI's scaled fp8: weights dequantized with their scales
    names = t5_spec.model_keys({k: k for k in file_shapes if k not in scaled}, prefix)  # model's name -> file's
    shapes = {k: file_shapes[v] for k, v in names.items()}
    config = t5_spec.config_from_shapes(shapes, path.name)
    t5_spec.check_against(path.name, shapes, config)
    if scaled:
        return t5_formats.load_scaled_fp8(path, prefix, config, dtype, qconfig)
    if qconfig is None and not {prefix + t5_spec.EMBEDDING, prefix + t5_spec.EMBEDDING_ALIAS} <= file_shapes.keys():
        return _read_assigned(path, names, config, dtype)
    # transformers streams a folder's model.safetensors; give it one that points at the user's file.
    with tempfile.TemporaryDirectory(prefix="pixart_t5_") as tmp:
        config.save_pretrained(tmp)
        os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
        mapping = {f"^{re.escape(prefix)}": ""} if prefix else None
        return _from_pretrained(Path(tmp), path.name, dtype, qconfig, mapping)


def _read_assigned(path: Path, names: dict[str, str], config, dtype: torch.dtype) -> torch.nn.Module:
    """An unquantized T5 from a plain safetensors file, the model transformers' from_pretrained builds from it (the
    same tensors in `dtype`, the embedding tied), read with files.read_state_dict: each tensor converted straight
    from the file's memory map, several at once, and the file's pages never held beside the model (transformers'
    loader keeps them mapped while it loads). `names`: the model's tensor names -> the file's (t5_spec.model_keys);
    a file holding both embedding names goes through transformers, which ties them only when they are equal."""
    from transformers import T5EncoderModel

    read = files.read_state_dict(path, dtype, keys=names.values())
    sd = {k: read.pop(v) for k, v in names.items()}
    sd[t5_spec.EMBEDDING_ALIAS] = sd[t5_spec.EMBEDDING]
    with empty_weights():
        model = T5EncoderModel(config)
    assign_state_dict(model, sd)
    model.tie_weights()  # one Parameter for both names, as transformers leaves them
    model.config.dtype = dtype
    return model.eval().requires_grad_(False)


def _from_pretrained(folder: Path, name: str, dtype: torch.dtype, qconfig, key_mapping, cpu: bool = False):
    from transformers import T5EncoderModel

    # Quantized loads (also of a pre-quantized folder: `cpu`) default to the GPU in transformers; load on the CPU so ComfyUI's model management decides
    # when the T5 goes to the GPU (and accounts for it), as for every other model.
    model, info = T5EncoderModel.from_pretrained(
        str(folder), dtype=dtype, quantization_config=qconfig, local_files_only=True, output_loading_info=True,
        key_mapping=key_mapping, device_map={"": "cpu"} if qconfig is not None or cpu else None,
    )
    missing = [k for k in info.get("missing_keys", []) if k != t5_spec.EMBEDDING_ALIAS]
    if missing:
        raise files.WeightFileError(f"{name}: weights are missing for {sorted(missing)[:4]} ({len(missing)} in all).")
    quant.single_int8_copy(model)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- quantize once


@dataclasses.dataclass
class Outcome:
    """How a load through the quantized-T5 cache went, for the log and the bench."""

    entry: Path
    hit: bool
    reason: str | None  # why the entry was (re)built
    written: bool
    quantized_on: str | None


def _load_quantized_once(path: Path, quantization: str, dtype: torch.dtype, qconfig, cache_dir: Path,
                         quantize_device: torch.device | None,
                         make_room: Callable[[int], None] | None) -> tuple[torch.nn.Module, Outcome]:
    """The quantized T5 from its cache entry; else quantized now and written to the cache first: tensor by tensor
    on `quantize_device` where that is a CUDA GPU (then read back from the entry), else by transformers' loader on
    the CPU. A cache that cannot be written only costs the next load its time: the model quantized now is returned
    and the log says why nothing was cached."""
    key = t5_cache.cache_key(path, quantization, dtype)
    entry = t5_cache.entry_dir(cache_dir, path, quantization, dtype)
    reason = t5_cache.check(entry, key)
    if reason is None:
        try:
            t5_cache.prefetch(entry)
            model = _from_pretrained(entry, path.name, dtype, None, None, cpu=True)
            log.info("PixArt T5 cache: read %s (quantized before; delete the folder to quantize again).", entry)
            return model, Outcome(entry, True, None, False, t5_cache.quantized_on(entry))
        except Exception as e:  # noqa: BLE001 - any failure to read an entry means: rebuild it
            reason = f"transformers could not load it ({e})"
            log.warning("PixArt T5 cache: %s: %s; rebuilding it.", entry.name, reason)
    elif reason != "no entry yet":
        log.warning("PixArt T5 cache: %s: %s; rebuilding it.", entry.name, reason)
    if quantize_device is not None and quantize_device.type == "cuda" and \
            _quantize_into(entry, key, path, quantization, dtype, quantize_device, make_room):
        model = _from_pretrained(entry, path.name, dtype, None, None, cpu=True)
        return model, Outcome(entry, False, reason, True, str(quantize_device))
    model = _load(path, dtype, qconfig)
    written = False
    if quant.has_bnb_layers(model):
        try:
            t5_cache.write(entry, key, model.config, t5_cache.tensors_of(model), "cpu")
            written = True
            log.info("PixArt T5 cache: quantized on the CPU into %s; later loads read it.", entry)
        except (OSError, t5_cache.CacheError) as e:
            log.warning("PixArt T5 cache: cannot write %s (%s); the next load quantizes again.", entry, e)
    return model, Outcome(entry, False, reason, written, "cpu")


def _quantize_into(entry: Path, key: dict, path: Path, quantization: str, dtype: torch.dtype,
                   device: torch.device, make_room: Callable[[int], None] | None) -> bool:
    """Quantize the source tensor by tensor on `device` into the cache entry, after asking `make_room` for the
    device memory that takes; False (and the log says why) where the quantizer does not read the source, the
    device runs out of memory or the entry cannot be written: then the CPU quantizes it."""
    try:
        if make_room is not None:
            make_room(t5_quantize.device_bytes(path, quantization, dtype))
        tensors, config = t5_quantize.quantize_per_tensor(path, quantization, dtype, device)
    except t5_quantize.UnsupportedSource as e:
        log.info("PixArt T5: quantizing on the CPU (%s).", e)
        return False
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError, also under its older name
        log.warning("PixArt T5: %s ran out of memory quantizing %s (%s); quantizing on the CPU instead.",
                    device, path.name, str(e).splitlines()[0] if str(e) else "out of memory")
        return False
    try:
        t5_cache.write(entry, key, config, tensors, str(device))
    except (OSError, t5_cache.CacheError) as e:
        log.warning("PixArt T5 cache: cannot write %s (%s); quantizing on the CPU instead.", entry, e)
        return False
    log.info("PixArt T5 cache: quantized on %s into %s.", device, entry)
    return True


# ------------------------------------------------------------------------------------------- text


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


def cache_key(identity: tuple, text: str, cleaning: str, max_tokens: int) -> tuple:
    """What an encoding depends on: the T5 (file and load settings), the text T5 reads (preprocess's result), the
    cleaning that made it, the limit."""
    return (identity, text, cleaning, max_tokens)


def encode(t5: LoadedT5, tokenizer, prompt: str, max_tokens: int, device: torch.device, pad: bool = False,
           cleaning: str = captions.DEFAULT_MODE, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_text of the prompt after caption cleaning (preprocess)."""
    return encode_text(t5, tokenizer, preprocess(prompt, cleaning), max_tokens, device, pad=pad, warn=warn)


@torch.no_grad()
def encode_text(t5: LoadedT5, tokenizer, text: str, max_tokens: int, device: torch.device, pad: bool = False,
                warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 last hidden state [1, n, C] (float32) and attention mask [1, n] of `text` (a prompt already cleaned:
    preprocess), truncated to max_tokens.

    Without `pad`, n is the prompt's real token count (EOS included): padding to max_tokens, as diffusers does,
    changes nothing that the masked DiT reads (padded keys are masked out of every attention, and T5's real
    tokens never attend to pads), so it is skipped; `pad=True` gives diffusers' exact [1, max_tokens] tensors.
    A prompt longer than max_tokens keeps its first max_tokens - 1 tokens and EOS, as diffusers' tokenizer call does.
    """
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

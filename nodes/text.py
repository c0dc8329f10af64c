"""T5 loader and prompt encoder nodes."""
from __future__ import annotations

import logging

import torch
from comfy_api.v0_0_2 import io

from ..pixart_core import captions, t5_spec
from ..pixart_core import t5 as core_t5
from ..pixart_core.cache import LRUCache
from ..pixart_core.conditioning import Conditioning
from . import clip_t5
from .comfy import devices, loading, paths, progress
from .search_aliases import search_aliases
from .types import CATEGORY, T5, ConditioningType, T5Handle
from ..pixart_core.logs import logger_name

log = logging.getLogger(logger_name(__name__))
T5_FOLDERS = ("text_encoders",)  # ComfyUI's text_encoders list includes models/clip
T5_EXT = (*paths.WEIGHT_EXT[:2], *paths.GGUF_EXT)
# Recent prompt embeddings (~5 MB each at 300 x 4096 fp32): re-encoding a prompt seen lately never loads the T5.
EMBEDDINGS = LRUCache(max_items=16)
DEVICES = ("default", "cpu")  # as ComfyUI's CLIPLoader
# Widget labels -> the core's ids. Saved workflows hold the labels: keep every label (and its order) as it is.
QUANTIZATION_LABELS = {"none": t5_spec.QUANT_NONE, "8-bit (bitsandbytes)": t5_spec.QUANT_8BIT,
                       "4-bit nf4 (bitsandbytes)": t5_spec.QUANT_NF4}
QUANTIZATION_NAMES = {q: label for label, q in QUANTIZATION_LABELS.items()}  # for messages: as the widget says
CLEANING_LABELS = {"diffusers": captions.DIFFUSERS, "lowercase": captions.LOWERCASE, "none": captions.NONE}
DEFAULT_QUANTIZATION, DEFAULT_CLEANING = "none", "diffusers"


def _id(labels: dict[str, str], label: str, widget: str) -> str:
    if label not in labels:
        raise ValueError(f"PixArt: {widget} {label!r} is not one of {list(labels)}.")
    return labels[label]


class T5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaT5Loader",
            display_name="PixArt-Σ T5 Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the T5-v1.1-XXL text encoder, optionally quantized with bitsandbytes.",
            **search_aliases("pixart sigma t5 loader", "t5xxl", "text encoder loader", "load clip t5", "gguf t5"),
            inputs=[
                io.Combo.Input("t5_name", options=paths.choices(T5_FOLDERS, "text_encoder", T5_EXT),
                               tooltip="A T5-v1.1-XXL single file in models/text_encoders or models/clip "
                                       "(t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn[_scaled].safetensors, or a GGUF "
                                       "t5-v1_1-xxl-encoder-Q8_0.gguf ... Q3_K_S.gguf of types F32/F16/BF16, Q8_0, "
                                       "Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K, IQ4_NL, IQ4_XS) or a "
                                       "diffusers/transformers folder in models/diffusers."),
                io.Combo.Input("quantization", options=list(QUANTIZATION_LABELS), default=DEFAULT_QUANTIZATION,
                               tooltip="bitsandbytes 8-bit (T5-XXL: 5.5 GiB) or 4-bit nf4 (4.0 GiB) instead of 8.9 GiB in bf16, "
                                       "on any NVIDIA GPU (on the CPU with fp32: 7.6 / 6.1 GiB). Loaded whole: they "
                                       "cannot stream. Quantized once (on ComfyUI's GPU when there is one) and kept in "
                                       "models/pixart_t5_cache for later loads. GGUF files are already quantized: use "
                                       "'none' with them."),
                io.Combo.Input("dtype", options=list(core_t5.DTYPES), default="auto",
                               tooltip="Compute dtype. Never fp16: T5-XXL overflows in fp16. auto = bf16 where ComfyUI uses bf16 "
                                       "(NVIDIA from RTX 30xx/A100, Apple M-series on macOS 14+), else fp32; fp32 on CPU."),
                io.Combo.Input("device", options=list(DEVICES), default=DEVICES[0], optional=True,
                               tooltip="Where T5 runs. default: ComfyUI's text-encoder device (the GPU). cpu: always on "
                                       "the CPU (as CLIPLoader's device option), so encoding never takes GPU memory "
                                       "from the DiT; slower per prompt."),
            ],
            outputs=[T5.Output(display_name="t5", tooltip="The T5 encoder, for PixArt-Σ Text Encode (or a LoRA "
                                                          "loader's t5 input).")],
        )

    @classmethod
    def execute(cls, t5_name: str, quantization: str, dtype: str, device: str = DEVICES[0]) -> io.NodeOutput:
        mode = _id(QUANTIZATION_LABELS, quantization, "quantization")
        path = paths.resolve(t5_name, T5_FOLDERS)
        load_device, offload_device = devices.t5_devices(cpu=device == "cpu")
        compute = core_t5.compute_dtype(dtype, devices.auto_dtype("t5", load_device))
        tokenizer = core_t5.load_tokenizer(core_t5.tokenizer_candidates(path) + [paths.COMFY_TOKENIZER])
        gpu = loading.quantizer_device()
        # on a CUDA GPU the layers bitsandbytes leaves unquantized are stored in bf16 (computing in `compute`): a
        # quantized T5 then takes the same VRAM with or without bf16; elsewhere they stay as transformers loads them
        loaded = core_t5.load_t5(path, mode, compute, cache_dir=paths.t5_cache_dir(), quantize_device=gpu,
                                 make_room=loading.make_room(gpu) if gpu is not None else None,
                                 unquantized_dtype=torch.bfloat16 if load_device.type == "cuda" else None)
        patcher = loading.wrap(loaded.model, load_device, offload_device)
        log.info("PixArt T5 %s loaded (%s, %s, runs on %s)", t5_name, quantization, compute, load_device)
        stat = path.stat()
        identity = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, mode, str(compute), str(load_device))
        return io.NodeOutput(T5Handle(patcher, tokenizer, compute, t5_name, mode, identity))


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PixArtSigmaTextEncode",
            display_name="PixArt-Σ Text Encode",
            category=f"{CATEGORY}/conditioning",
            description="Encodes a positive and a negative prompt with T5 (cleaned as caption_cleaning says, cut to the token limit, with attention mask).",
            **search_aliases("pixart sigma text encode", "prompt", "clip text encode", "t5 encode"),
            inputs=[
                io.MultiType.Input("t5", types=[T5, io.Clip],
                                   tooltip="The T5 encoder from PixArt-Σ T5 Loader, or a ComfyUI CLIP holding "
                                           "T5-XXL (CLIPLoader type sd3/pixart, DualCLIPLoader, a GGUF CLIP loader): "
                                           "encoded with this node's tokenization, token limit and mask."),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="What the image should show. Cleaned as caption_cleaning says before T5 reads it."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="What to steer away from. Empty = the padded empty string, as the reference uses."),
                io.Int.Input("max_tokens", default=core_t5.AUTO_TOKENS, min=0, max=1024,
                             tooltip="T5 token limit. 0 = from the DiT: 300 for PixArt-Σ, 120 for PixArt-α (the sampler "
                                     "picks it). Longer prompts are cut with a warning."),
                io.Combo.Input("caption_cleaning", options=list(CLEANING_LABELS), default=DEFAULT_CLEANING,
                               optional=True,
                               tooltip="diffusers: diffusers' caption cleaning (drops URLs, HTML, @names, CJK, odd "
                                       "punctuation; lowercases), as PixArtSigmaPipeline does by default. lowercase: "
                                       "lowercase and strip only. none: strip only, as the original PixArt-Σ script."),
            ],
            outputs=[ConditioningType.Output("POSITIVE", display_name="positive",
                                             tooltip="The positive prompt's T5 embeddings and attention mask."),
                     ConditioningType.Output("NEGATIVE", display_name="negative",
                                             tooltip="The negative prompt's T5 embeddings and attention mask.")],
        )

    @classmethod
    def execute(cls, t5, positive: str, negative: str, max_tokens: int,
                caption_cleaning: str = DEFAULT_CLEANING) -> io.NodeOutput:
        src = _source(t5)
        cleaning = _id(CLEANING_LABELS, caption_cleaning, "caption_cleaning")
        limits = core_t5.token_limits(max_tokens)
        texts = [core_t5.preprocess(prompt, cleaning) for prompt in (positive, negative)]  # cleaned once, used twice
        keys = [core_t5.cache_key(src.identity, text, cleaning, max_tokens) for text in texts]
        out = [EMBEDDINGS.get(k) for k in keys]
        if any(c is None for c in out):
            loaded, device = src.load()
            keep = devices.intermediate_device()

            def encode(text: str, limit: int, warn: bool) -> Conditioning:
                progress.check_interrupt()
                embeds, mask = core_t5.encode_text(loaded, src.tokenizer, text, limit, device, warn=warn)
                return Conditioning(embeds.to(keep), mask.to(keep))

            for i, (key, text) in enumerate(zip(keys, texts)):
                if out[i] is None:
                    cond = encode(text, limits[0], True)
                    for limit in limits[1:]:  # max_tokens 0: the shorter limits too, where the prompt is longer
                        if cond.mask.shape[1] > limit:
                            cond.at_limit[limit] = encode(text, limit, False)
                    out[i] = cond
                    EMBEDDINGS.put(key, cond)
        return io.NodeOutput(*out)


def _source(t5) -> clip_t5.Source:
    """Text Encode's t5 input (our T5 Loader's handle, or a ComfyUI CLIP) as what encoding needs."""
    if t5 is None:  # a LoRA loader's t5 output whose t5 input is not connected
        raise ValueError("PixArt Text Encode got no T5: the t5 output of PixArt-Σ LoRA Loader carries a T5 only when "
                         "its t5 input is connected. Connect PixArt-Σ T5 Loader to the LoRA loader's t5 input, or "
                         "wire the T5 Loader straight into Text Encode.")
    if not isinstance(t5, T5Handle):
        return clip_t5.source(t5)

    def load():
        ready = loading.use(t5.patcher)
        return core_t5.LoadedT5(ready.model), ready.device

    return clip_t5.Source(t5.identity, t5.tokenizer, load)

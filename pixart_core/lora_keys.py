"""Where a LoRA file's keys point: the naming conventions of PixArt LoRA files (diffusers/PEFT, kohya/LyCORIS,
PixArt's original layout, the T5 encoder), every name they may give a module of our DiT or T5, and what another
model's LoRA keys look like (pure key naming, no ComfyUI)."""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from .transformer import _BLOCK_RENAMES, _RENAMES

# Tensor name endings the weight adapters read, and what a row split of the patched weight does to each:
# "up": split along dim 0 (its rows are the weight's rows), "shared": kept whole for every part,
# "kron1"/"kron2": LoKr's Kronecker factors (see _split_lokr), "other": cannot be split (refused on fused layers).
SUFFIXES: dict[str, str] = {
    ".lora_up.weight": "up", ".lora_down.weight": "shared", ".lora_mid.weight": "other",
    ".lora_B.weight": "up", ".lora_A.weight": "shared",
    "_lora.up.weight": "up", "_lora.down.weight": "shared",
    ".lora.up.weight": "up", ".lora.down.weight": "shared",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "shared",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "shared",
    ".lora_B": "up", ".lora_A": "shared",
    ".alpha": "shared", ".dora_scale": "other", ".reshape_weight": "other",
    # PEFT's DoRA magnitude (as PEFT, diffusers and PEFT's default adapter name it): read as ComfyUI's dora_scale
    ".lora_magnitude_vector": "other", ".lora_magnitude_vector.weight": "other",
    ".lora_magnitude_vector.default.weight": "other",
    ".hada_w1_a": "up", ".hada_w1_b": "shared", ".hada_w2_a": "up", ".hada_w2_b": "shared",
    ".hada_t1": "other", ".hada_t2": "other",
    ".lokr_w1": "kron1", ".lokr_w1_a": "kron1", ".lokr_w1_b": "shared",
    ".lokr_w2": "kron2", ".lokr_w2_a": "kron2", ".lokr_w2_b": "shared", ".lokr_t2": "other",
    ".oft_blocks": "other", ".rescale": "other",
    ".a1.weight": "other", ".a2.weight": "other", ".b1.weight": "other", ".b2.weight": "other",
    ".diff": "up", ".diff_b": "up", ".w_norm": "other", ".b_norm": "other", ".set_weight": "other",
}
BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
                  ".lora_A", ".lora_B")
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_magnitude_vector.default.weight")
# Adapter tensors that name a layer in a form no ComfyUI weight adapter reads, and whose they are.
PEFT_ONLY = {"oft_R": "PEFT's OFT", "boft_R": "PEFT's BOFT", "boft_s": "PEFT's BOFT",
             "vera_lambda_b": "PEFT's VeRA", "vera_lambda_d": "PEFT's VeRA", "ia3_l": "PEFT's IA3",
             "lora_E": "PEFT's AdaLoRA"}
_KOHYA = ("lora_unet_", "lora_transformer_", "lycoris_")
_DIFFUSERS_PREFIXES = ("", "transformer.", "base_model.model.", "transformer.base_model.model.",
                       "unet.base_model.model.", "unet.")
_ORIGINAL_PREFIXES = ("", "diffusion_model.", "model.diffusion_model.", "base_model.model.", "transformer.")
_T5_PREFIXES = ("", "text_encoder.", "text_encoder.base_model.model.", "text_encoders.t5xxl.transformer.")
_T5_KOHYA = ("lora_te_", "lora_te1_")
T5_LIKE = re.compile(r"^(lora_te\d*_|text_encoders?[._]|te\d*[._])")


@dataclasses.dataclass
class Target:
    """Where a module name in a LoRA file points: our parameter(s); several (with row counts) for a fused layer."""

    params: tuple[str, ...]
    rows: tuple[int, ...] | None = None  # a fused layer: rows of each part, in order
    layout: str = "diffusers"  # "diffusers", "kohya", "original", "t5"


def missing_factor(suffixes: Iterable[str]) -> str | None:
    """The first tensor a LoHa or LoKr module lacks for its product, or None. LoHa needs both factor pairs; LoKr
    needs each factor whole (.lokr_wN) or as both halves (.lokr_wN_a, .lokr_wN_b), as ComfyUI's adapters read them
    (without one, they fail or skip the layer)."""
    have = set(suffixes)
    needs = [".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"] if any(s.startswith(".hada_") for s in have) else []
    if any(s.startswith(".lokr_") for s in have):
        needs += [half for n in "12" if f".lokr_w{n}" not in have for half in (f".lokr_w{n}_a", f".lokr_w{n}_b")]
    return next((s for s in needs if s not in have), None)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, suffix) for a tensor name with a suffix the weight adapters know; None otherwise."""
    for s in BY_LENGTH:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    return None


def _original_name(module: str) -> str | None:
    """Our (diffusers) module path -> PixArt's original module path (non-fused layers only)."""
    for orig, ours in _RENAMES:
        ours_m, orig_m = ours.rstrip("."), orig.rstrip(".")
        if module == ours_m:
            return orig_m
    if module.startswith("transformer_blocks."):
        _, n, rest = module.split(".", 2)
        for orig, ours in _BLOCK_RENAMES:
            if rest == ours.rstrip("."):
                return f"blocks.{n}.{orig.rstrip('.')}"
    return None


def _aliases(module: str, prefixes: Iterable[str], kohya: Iterable[str]) -> list[str]:
    return [p + module for p in prefixes] + [k + module.replace(".", "_") for k in kohya]


def dit_targets(param_shapes: dict[str, tuple[int, ...]]) -> dict[str, Target]:
    """Every name a LoRA file may give a module of this DiT (diffusers, PEFT, kohya and original-layout forms)."""
    out: dict[str, Target] = {}
    for p in param_shapes:
        if not p.endswith(".weight"):
            continue
        m = p[: -len(".weight")]
        for a in _aliases(m, _DIFFUSERS_PREFIXES, ()):
            out[a] = Target((p,), layout="diffusers")
        for a in _aliases(m, (), _KOHYA):
            out[a] = Target((p,), layout="kohya")
        orig = _original_name(m)
        if orig is not None:
            for a in _aliases(orig, _ORIGINAL_PREFIXES, _KOHYA):
                out[a] = Target((p,), layout="original")
    blocks = sorted({int(p.split(".")[1]) for p in param_shapes if p.startswith("transformer_blocks.")})
    for n in blocks:
        for fused, attn, parts in ((f"blocks.{n}.attn.qkv", "attn1", "qkv"), (f"blocks.{n}.cross_attn.kv_linear", "attn2", "kv")):
            params = tuple(f"transformer_blocks.{n}.{attn}.to_{c}.weight" for c in parts)
            if all(q in param_shapes for q in params):
                rows = tuple(param_shapes[q][0] for q in params)
                for a in _aliases(fused, _ORIGINAL_PREFIXES, _KOHYA):
                    out[a] = Target(params, rows, layout="original")
    return out


def t5_targets(param_shapes: dict[str, tuple[int, ...]]) -> dict[str, Target]:
    """Every name a LoRA file may give a module of a transformers T5 encoder (kohya lora_te_/lora_te1_, PEFT
    text_encoder., ComfyUI's text_encoders.t5xxl.transformer.)."""
    out: dict[str, Target] = {}
    for p in param_shapes:
        if p.endswith(".weight") and not p.endswith("embed_tokens.weight"):  # tied to shared.weight
            m = p[: -len(".weight")]
            for a in _aliases(m, _T5_PREFIXES, _T5_KOHYA):
                out[a] = Target((p,), layout="t5")
    return out


# What another model's LoRA keys contain (dots and underscores alike), most specific first.
_FOREIGN = (
    (("single_transformer_blocks", "double_blocks", "single_blocks", "txt_attn", "img_attn", "img_mlp"),
     "a Flux LoRA"),
    (("joint_blocks", "context_block", "x_block_"), "a Stable Diffusion 3 (MMDiT) LoRA"),
    (("add_q_proj", "add_k_proj", "ff_context"), "a LoRA for an MMDiT model (Flux or Stable Diffusion 3)"),
    (("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block"), "unet"),
    (("text_model_encoder_layers",), "a LoRA for a CLIP text encoder only"),
)


def describe_lora(keys: Iterable[str]) -> str | None:
    """Which other model a LoRA's keys were made for (SDXL, SD1.x/2.x, Flux, SD3, ...), or None if none of them."""
    norm = [k.replace(".", "_") for k in keys]

    def has(*fragments: str) -> bool:
        return any(f in k for k in norm for f in fragments)

    for fragments, what in _FOREIGN:
        if has(*fragments):
            if what != "unet":
                return what
            # SDXL: a second text encoder, or UNet levels with more than one transformer block (SD1.x has one)
            if has("lora_te2_", "text_encoder_2") or re.search(r"transformer_blocks_[1-9]", " ".join(norm)):
                return "a Stable Diffusion XL LoRA (UNet keys such as input_blocks / down_blocks)"
            return "a Stable Diffusion 1.x/2.x LoRA (UNet keys such as input_blocks / down_blocks)"
    return None

"""PixArt DiT: diffusers config from a state dict + variant, and loading (meta device, assigned weights)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import dtypes, files
from .meta import assign_state_dict, empty_weights
from .variants import DEFAULT_VARIANT, PRESETS, Variant, variant_from_config, variant_from_name
from .logs import logger_name

log = logging.getLogger(logger_name(__name__))

HEAD_DIM = 72  # every released PixArt (XL/2 and the 42-block community models) uses 72-wide heads
_ANCHOR = "transformer_blocks.0.attn1.to_q.weight"
DTYPES = ("auto", "bf16", "fp16", "fp32")


def compute_dtype(choice: str, auto: torch.dtype = torch.float32) -> torch.dtype:
    """The DiT dtype: what the user chose, or `auto` (what "auto" is on the load device)."""
    return dtypes.pick(choice, auto, "DiT", DTYPES)


def config_from_state_dict(sd: dict[str, torch.Tensor], variant: Variant, name: str) -> dict[str, Any]:
    """The PixArtTransformer2DModel config that a diffusers-layout state dict and a variant imply."""
    proj = sd["pos_embed.proj.weight"]  # [inner, in_channels, patch, patch]
    inner, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if inner % HEAD_DIM:
        raise files.WeightFileError(f"{name}: hidden width {inner} is not a multiple of PixArt's head size {HEAD_DIM}.")
    out_channels = sd["proj_out.weight"].shape[0] // (patch * patch)
    layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    micro = any(k.startswith("adaln_single.emb.resolution_embedder") for k in sd)
    if micro != variant.micro_conditioning:
        raise files.WeightFileError(
            f"{name}: the weights {'have' if micro else 'lack'} the resolution/aspect-ratio embedders, so they are "
            f"{'PixArt-α 1024-MS' if micro else 'not PixArt-α 1024-MS'}, but the variant is {variant.name}. "
            "Pick the matching variant in the loader (or 'auto')."
        )
    return diffusers_config(variant, heads=inner // HEAD_DIM, layers=layers,
                            caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
                            cross_attention_dim=sd["transformer_blocks.0.attn2.to_k.weight"].shape[0],
                            in_channels=in_channels, out_channels=out_channels, patch=patch)


def diffusers_config(variant: Variant, *, heads: int = 16, layers: int = 28, caption_channels: int = 4096,
                     cross_attention_dim: int | None = None, in_channels: int = 4, out_channels: int = 8,
                     patch: int = 2) -> dict[str, Any]:
    """The PixArtTransformer2DModel config of a variant at a size (the defaults: XL/2, 0.6B parameters)."""
    return {
        "num_attention_heads": heads,
        "attention_head_dim": HEAD_DIM,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": layers,
        "cross_attention_dim": cross_attention_dim or heads * HEAD_DIM,
        "attention_bias": True,
        "sample_size": variant.sample_size,
        "patch_size": patch,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": variant.interpolation_scale,
        "use_additional_conditions": variant.micro_conditioning,
        "caption_channels": caption_channels,
    }


# Original PixArt key prefix -> diffusers key prefix (fused qkv / kv tensors are split in convert_original).
_RENAMES = (
    ("x_embedder.proj.", "pos_embed.proj."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
)
_BLOCK_RENAMES = (
    ("attn.proj.", "attn1.to_out.0."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("mlp.fc1.", "ff.net.0.proj."),
    ("mlp.fc2.", "ff.net.2."),
    ("scale_shift_table", "scale_shift_table"),
)
_DROPPED = ("pos_embed", "y_embedder.y_embedding")  # diffusers computes / does not keep these


def is_original_layout(sd: dict[str, torch.Tensor]) -> bool:
    """The original PixArt release's keys (t_block and y_embedder are PixArt's own names)."""
    return any(k.endswith("t_block.1.weight") for k in sd) and any(k.endswith("y_embedder.y_proj.fc1.weight") for k in sd)


def convert_original(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Original PixArt keys (blocks.N.attn.qkv, y_embedder, t_block, ...) -> diffusers keys; fused qkv/kv split.

    Fails naming every key it does not know, instead of dropping it silently.
    """
    sd = files.strip_prefix(sd, "x_embedder.proj.weight")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        new = next((d + key[len(o):] for o, d in _RENAMES if key.startswith(o)), None)
        if new is None and key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            base = f"transformer_blocks.{n}."
            if rest.startswith("attn.qkv."):
                for part, t in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    out[f"{base}attn1.{part}.{rest.rsplit('.', 1)[1]}"] = t
                continue
            if rest.startswith("cross_attn.kv_linear."):
                for part, t in zip(("to_k", "to_v"), value.chunk(2, dim=0)):
                    out[f"{base}attn2.{part}.{rest.rsplit('.', 1)[1]}"] = t
                continue
            new = next((base + d + rest[len(o):] for o, d in _BLOCK_RENAMES if rest.startswith(o)), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise files.WeightFileError(
            f"{name}: {len(unknown)} keys of this original-layout PixArt file are unknown "
            f"(e.g. {', '.join(sorted(unknown)[:4])}); it may be a variant this loader does not support yet."
        )
    return out


def resolve_variant(choice: str, name: str, sd_keys: list[str] | None = None, config: dict | None = None) -> tuple[Variant, str]:
    """The variant to load as, and how it was decided (shown to the user)."""
    if choice != "auto":
        if choice not in PRESETS:
            raise ValueError(f"Unknown PixArt variant {choice!r}; choose one of {['auto', *PRESETS]}.")
        return PRESETS[choice], "chosen in the loader"
    if config is not None:
        return variant_from_config(config, name), "from config.json and the name"
    by_name = variant_from_name(name)
    micro = sd_keys is not None and any(k.startswith("adaln_single.emb.resolution_embedder") for k in sd_keys)
    if micro:
        return PRESETS["alpha-1024"], "from the weights (micro-conditioning embedders)"
    if by_name is not None and not by_name.micro_conditioning:
        return by_name, "from the file name"
    log.warning("PixArt: cannot tell the variant of %s from its name; assuming %s.", name, DEFAULT_VARIANT)
    return PRESETS[DEFAULT_VARIANT], f"assumed (name says nothing; default {DEFAULT_VARIANT})"


def _folder_state_dict(wdir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    index = wdir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            sd.update(files.read_state_dict(wdir / s, dtype))
        return sd
    for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (wdir / fname).is_file():
            return files.read_state_dict(wdir / fname, dtype)
    raise files.WeightFileError(f"{wdir}: no diffusion_pytorch_model.safetensors (or shards) in this folder.")


def load_dit(path: str | os.PathLike, variant_choice: str, dtype: torch.dtype):
    """Load a PixArt transformer (diffusers folder, or a single file in the diffusers or original layout) on the CPU.

    Returns (PixArtTransformer2DModel, Variant, how the variant was decided).
    """
    from diffusers import PixArtTransformer2DModel

    path = Path(path)
    folder_config = None
    if path.is_dir():
        wdir = files.component_folder(path, "transformer", "diffusers PixArt")
        files.check_folder(wdir)
        folder_config = json.loads((wdir / "config.json").read_text())
        if folder_config.get("_class_name") not in (None, "PixArtTransformer2DModel", "Transformer2DModel"):
            raise files.WeightFileError(
                f"{wdir}: config.json describes a {folder_config.get('_class_name')}, not a PixArt transformer."
            )
        sd = _folder_state_dict(wdir, dtype)
        name = path.name
    else:
        sd = files.read_state_dict(path, dtype)  # converted as read: never the file's and our dtype's copies at once
        name = path.name
        if variant_from_name(name) is None:  # the file's metadata may name the variant when its name does not
            hint = " ".join(str(v) for v in files.read_safetensors_metadata(path).values() if len(str(v)) < 200)
            if variant_from_name(hint) is not None:
                name = f"{name} ({hint})"
    if is_original_layout(sd):
        sd = convert_original(sd, name)
    sd = files.strip_prefix(sd, _ANCHOR)
    if "pos_embed.proj.weight" not in sd or not any(k.endswith(_ANCHOR) for k in sd):
        raise files.WeightFileError(
            f"{name}: this is not a PixArt transformer; it looks like "
            f"{files.describe(sd, files.shapes_of(sd))}. Choose a PixArt-Σ/α transformer file "
            "(models/checkpoints or models/diffusion_models) or a diffusers folder (models/diffusers)."
        )
    variant, how = resolve_variant(variant_choice, name, list(sd), folder_config if variant_choice == "auto" else None)
    config = config_from_state_dict(sd, variant, name)
    if folder_config is not None and variant_choice == "auto":
        # A folder's own value wins, as in diffusers; null (or absent) means diffusers' max(sample_size // 64, 1).
        config["interpolation_scale"] = folder_config.get("interpolation_scale")
    with empty_weights():
        model = PixArtTransformer2DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files.check_keys(name, sd, expected, f"a PixArt transformer ({variant.name}, {config['num_layers']} blocks)")
    files.check_shapes(name, files.shapes_of(sd), expected, f"a PixArt transformer ({variant.name})")
    assign_state_dict(model, sd)
    return model.eval().requires_grad_(False), variant, how + _sampling_hint(name)


def _sampling_hint(name: str) -> str:
    """Distilled checkpoints sample differently; say how when the name shows one."""
    low = name.lower()
    if "dmd" in low:
        return "; a DMD one-step model: use scheduler 'dmd 1-step (t=400)' with cfg 1"
    if "lcm" in low:
        return "; an LCM model: use scheduler 'lcm' with 4 steps and cfg 1"
    return ""


def to_original(sd: dict[str, torch.Tensor], y_embedding_tokens: int) -> dict[str, torch.Tensor]:
    """diffusers PixArt keys -> the original release's keys (the inverse of convert_original): q/k/v and k/v are
    fused. Tensors that keep their shape are the same tensors (no copy); the fused ones are new. The original's
    learned null caption `y_embedder.y_embedding` (only used for training-time caption dropout) is zeros of
    [y_embedding_tokens, caption channels]. Fails naming any key it does not know."""
    inverse_top = {d: o for o, d in _RENAMES}
    inverse_block = {d: o for o, d in _BLOCK_RENAMES}
    fused_parts = {"attn1.to_q.": ("attn.qkv.", ("to_q", "to_k", "to_v"), "attn1"),
                   "attn2.to_k.": ("cross_attn.kv_linear.", ("to_k", "to_v"), "attn2")}
    skipped = ("attn1.to_k.", "attn1.to_v.", "attn2.to_v.")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith("transformer_blocks."):
            _, n, rest = key.split(".", 2)
            fused = next((f for p, f in fused_parts.items() if rest.startswith(p)), None)
            if fused is not None:
                name, parts, attn = fused
                kind = rest.rsplit(".", 1)[1]
                out[f"blocks.{n}.{name}{kind}"] = torch.cat([sd[f"transformer_blocks.{n}.{attn}.{p}.{kind}"] for p in parts])
                continue
            if rest.startswith(skipped):
                continue
            new = next((f"blocks.{n}.{o}{rest[len(d):]}" for d, o in inverse_block.items() if rest.startswith(d)), None)
        else:
            new = next((o + key[len(d):] for d, o in inverse_top.items() if key.startswith(d)), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise files.WeightFileError(f"{len(unknown)} keys of this diffusers PixArt model have no original-layout "
                                    f"name (e.g. {', '.join(sorted(unknown)[:4])}).")
    caption = sd["caption_projection.linear_1.weight"]
    out["y_embedder.y_embedding"] = torch.zeros(y_embedding_tokens, caption.shape[1], dtype=caption.dtype,
                                                device=caption.device)
    return out


_FUSED = {"attn1.to_q.": ("attn.qkv.", 0), "attn1.to_k.": ("attn.qkv.", 1), "attn1.to_v.": ("attn.qkv.", 2),
          "attn2.to_k.": ("cross_attn.kv_linear.", 0), "attn2.to_v.": ("cross_attn.kv_linear.", 1)}


def original_target(key: str, rows: int) -> tuple[str, tuple[int, int, int] | None]:
    """Where the diffusers PixArt parameter `key` (with `rows` rows) is in the original layout that to_original
    writes: (original key, None), or for the fused q/k/v and k/v, (fused key, (0, first row, rows))."""
    if key.startswith("transformer_blocks."):
        _, n, rest = key.split(".", 2)
        for prefix, (name, index) in _FUSED.items():
            if rest.startswith(prefix):
                return f"blocks.{n}.{name}{rest[len(prefix):]}", (0, index * rows, rows)
        new = next((f"blocks.{n}.{o}{rest[len(d):]}" for o, d in _BLOCK_RENAMES if rest.startswith(d)), None)
    else:
        new = next((o + key[len(d):] for o, d in _RENAMES if key.startswith(d)), None)
    if new is None:
        raise KeyError(f"{key}: not a parameter of diffusers' PixArt transformer")
    return new, None


def position_embedding(width: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float,
                       device: torch.device | None = None) -> torch.Tensor:
    """The 2-D sin-cos position table [1, grid_h*grid_w, width] that diffusers' PixArt adds to the patch tokens
    (float32): base_size is the trained grid side (sample_size // patch), interpolation_scale pe_interpolation."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    return get_2d_sincos_pos_embed(width, (grid_h, grid_w), base_size=base_size,
                                   interpolation_scale=interpolation_scale, device=device, output_type="pt").float()[None]


def share_weights(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> int:
    """Point each parameter of a diffusers PixArt at its place in `original` (to_original's layout: the fused q/k/v
    and k/v rows for the split ones) where that tensor is on the same device with the same values and another
    storage, so that both layouts hold one copy; returns the bytes the model no longer holds on its own. A
    parameter whose values differ (a weight patch merged into one side) keeps its own tensor."""
    saved = 0
    for key, p in model.named_parameters():
        name, rows = original_target(key, p.shape[0])
        target = original.get(name)
        if target is None:
            continue
        if rows is not None:
            target = target.narrow(*rows)
        if (target.shape != p.shape or target.dtype != p.dtype or target.device != p.device
                or (target.untyped_storage().data_ptr(), target.storage_offset())
                == (p.untyped_storage().data_ptr(), p.storage_offset())):
            continue
        if torch.equal(p.data, target):
            p.data = target
            saved += p.numel() * p.element_size()
    return saved

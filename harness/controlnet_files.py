"""PixArt ControlNet test files: adapter state dicts made from diffusers' own BasicTransformerBlocks and linears, and
the layouts users have: the authors' whole checkpoint (PixArt-alpha `ControlPixArtHalf` state dict: `base_model.*` in
the original DiT layout + `controlnet.{i}.copied_block/before_proj/after_proj.*`, wrapped in {"state_dict": ...} as
their app reads it), an adapter .safetensors (diffusers research project / SimpleTuner keys
`controlnet_blocks.{i}.before_proj/transformer_block/after_proj.*`) and an adapter folder; plus other models'
ControlNets (diffusers' ControlNetModel) for the refusals. Key names here come from the reference code, never from
pixart_core. Never imports ComfyUI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import models


def adapter_state_dict(dit, blocks: int, seed: int = 0, noise: float = 0.05, zero_after: bool = False,
                       ) -> dict[str, torch.Tensor]:
    """An adapter-layout state dict for `dit`: control block i a copy of the DiT's block i (as the research project's
    from_transformer makes them) with its weights moved by `noise`, block 0's before_proj and every after_proj random
    nn.Linear (zero after_proj with `zero_after`, as when training starts)."""
    g = torch.Generator().manual_seed(seed)
    width = dit.config.num_attention_heads * dit.config.attention_head_dim
    out: dict[str, torch.Tensor] = {}
    for i in range(blocks):
        block = copy.deepcopy(dit.transformer_blocks[i])
        for k, v in block.state_dict().items():
            out[f"controlnet_blocks.{i}.transformer_block.{k}"] = (v + noise * torch.randn(v.shape, generator=g)).contiguous()
        names = (["before_proj"] if i == 0 else []) + ["after_proj"]
        for name in names:
            linear = torch.nn.Linear(width, width)
            scale = 0.0 if (zero_after and name == "after_proj") else 0.3 / width ** 0.5
            out[f"controlnet_blocks.{i}.{name}.weight"] = torch.randn(linear.weight.shape, generator=g) * scale
            out[f"controlnet_blocks.{i}.{name}.bias"] = torch.randn(linear.bias.shape, generator=g) * scale
    return out


# research project BasicTransformerBlock names -> the authors' PixArt block names (PixArt-alpha
# diffusion/model/nets/PixArt.py PixArtBlock, PixArt_blocks.py MultiHeadCrossAttention / Mlp)
_BLOCK = {"attn1.to_out.0.": "attn.proj.", "attn2.to_q.": "cross_attn.q_linear.",
          "attn2.to_out.0.": "cross_attn.proj.", "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
          "scale_shift_table": "scale_shift_table"}


def adapter_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter keys -> the authors' `controlnet.{i}.*` keys: q/k/v fused into attn.qkv, k/v into cross_attn.kv_linear."""
    out = {}
    for key, v in sd.items():
        _, i, rest = key.split(".", 2)
        if not rest.startswith("transformer_block."):
            out[f"controlnet.{i}.{rest}"] = v
            continue
        rest = rest[len("transformer_block."):]
        kind = rest.rsplit(".", 1)[-1]
        src = f"controlnet_blocks.{i}.transformer_block."
        if rest.startswith("attn1.to_q."):
            out[f"controlnet.{i}.copied_block.attn.qkv.{kind}"] = torch.cat([sd[f"{src}attn1.to_{c}.{kind}"] for c in "qkv"])
        elif rest.startswith("attn2.to_k."):
            out[f"controlnet.{i}.copied_block.cross_attn.kv_linear.{kind}"] = torch.cat(
                [sd[f"{src}attn2.to_{c}.{kind}"] for c in "kv"])
        elif not rest.startswith(("attn1.to_k.", "attn1.to_v.", "attn2.to_v.")):
            d = next(d for d in _BLOCK if rest.startswith(d))
            out[f"controlnet.{i}.copied_block.{_BLOCK[d]}{rest[len(d):]}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def authors_checkpoint(dit, adapter_sd: dict[str, torch.Tensor], caption_tokens: int = 120,
                       with_base: bool = True) -> dict:
    """The authors' whole checkpoint as their training saves it: {"state_dict": base_model.* + controlnet.*}; the
    base's stored position table has the DiT's trained token count (sample_size / patch)^2 and its learned null
    caption `caption_tokens` rows (120 in PixArt-α, 300 in PixArt-Σ)."""
    sd = {}
    if with_base:
        width = dit.config.num_attention_heads * dit.config.attention_head_dim
        tokens = (dit.config.sample_size // dit.config.patch_size) ** 2
        null = torch.zeros(caption_tokens, dit.config.caption_channels)
        base = models.dit_to_original(dit.state_dict(), pos_embed=torch.zeros(1, tokens, width), y_embedding=null)
        sd.update({f"base_model.{k}": v for k, v in base.items()})
    sd.update(adapter_to_original(adapter_sd))
    return {"state_dict": sd}


def write_authors_checkpoint(path: Path, dit, adapter_sd: dict[str, torch.Tensor], caption_tokens: int = 120,
                             with_base: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(authors_checkpoint(dit, adapter_sd, caption_tokens, with_base), str(path))
    return path


def write_adapter_file(path: Path, adapter_sd: dict[str, torch.Tensor], prefix: str = "") -> Path:
    """An adapter .safetensors (keys optionally under a prefix such as 'controlnet.')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in adapter_sd.items()}, str(path))
    return path


def write_adapter_folder(folder: Path, adapter_sd: dict[str, torch.Tensor], heads: int | None = None,
                         style: str = "research") -> Path:
    """An adapter folder as `save_pretrained` writes it: the research project's config.json holds only num_layers;
    SimpleTuner's (`style='simpletuner'`) also the heads, head size and cross-attention width."""
    folder.mkdir(parents=True, exist_ok=True)
    blocks = len({k.split(".")[1] for k in adapter_sd})
    config = {"_class_name": "PixArtControlNetAdapterModel", "_diffusers_version": "0.30.0", "num_layers": blocks}
    if style == "simpletuner":
        width = adapter_sd["controlnet_blocks.0.after_proj.weight"].shape[0]
        config = {"_class_name": "PixArtSigmaControlNetAdapterModel", "_diffusers_version": "0.33.0",
                  "num_layers": blocks, "num_attention_heads": heads, "attention_head_dim": width // heads,
                  "cross_attention_dim": width}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in adapter_sd.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def unet_controlnet_state_dict(xl: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Stable Diffusion (or SDXL: text_time added embeddings) ControlNet from diffusers' ControlNetModel."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    kwargs = {"block_out_channels": (8, 16), "layers_per_block": 1, "in_channels": 4, "cross_attention_dim": 32,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "conditioning_embedding_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 4}
    if xl:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=8 * 6 + 32)
    return {k: v.contiguous() for k, v in ControlNetModel(**kwargs).state_dict().items()}


def ldm_unet_controlnet_state_dict(xl: bool = False) -> dict[str, torch.Tensor]:
    """A Stable Diffusion ControlNet in the original (ldm) layout, tiny shapes: the module names of lllyasviel/ControlNet
    cldm/cldm.py `ControlNet` (input_hint_block, input_blocks, zero_convs, middle_block_out, time_embed); SDXL's
    (Stability generative-models sgm ControlNet, as ComfyUI's comfy/controlnet.py reads it) adds `label_emb`."""
    g = torch.Generator().manual_seed(0)
    shapes = {"time_embed.0.weight": (32, 8), "input_hint_block.0.weight": (16, 3, 3, 3),
              "input_blocks.0.0.weight": (8, 4, 3, 3), "zero_convs.0.0.weight": (8, 8, 1, 1),
              "middle_block_out.0.weight": (8, 8, 1, 1)}
    if xl:
        shapes["label_emb.0.0.weight"] = (32, 16)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def transformer_controlnet_state_dict(kind: str) -> dict[str, torch.Tensor]:
    """A tiny ControlNet of another transformer from diffusers' own classes: 'sd3' (SD3ControlNetModel: control blocks
    `controlnet_blocks.N` single linears) or 'flux' (FluxControlNetModel: also `controlnet_single_blocks.N`)."""
    common = {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
              "pooled_projection_dim": 8}
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from torch's global RNG: leave the caller's alone
        torch.manual_seed(0)
        model = _transformer_controlnet(kind, common)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _transformer_controlnet(kind: str, common: dict):
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    if kind == "sd3":
        return SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, caption_projection_dim=16,
                                   pos_embed_max_size=8, **common)
    return FluxControlNetModel(patch_size=1, in_channels=4, num_single_layers=1, axes_dims_rope=[2, 2, 4], **common)

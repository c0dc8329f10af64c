"""The model factory: a T5 encoder, a PixArt DiT and a VAE with the real classes and random weights, at one of
three size presets, and the converters that save them in the layouts users have.

    tiny   2-block DiT (2 heads), 2-block T5 of width 64, small VAE: the tests and the runner's stand-ins
    bench  PixArt XL/2 (28 blocks, 16 heads, caption width 4096), T5 of the real width 4096 but 2 blocks, SDXL VAE
    full   PixArt XL/2 and the whole 24-block T5-v1.1-XXL (4.76B parameters: written tensor by tensor)

Configs come from pixart_core (transformer.diffusers_config, vae.diffusers_config) and names are read by its rules
(variants.variant_from_name, vae.family_from_name). Deterministic: a seed gives the same weights. Never imports
ComfyUI or the pack's nodes.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import torch

from pixart_core import transformer as core_dit
from pixart_core import vae as core_vae
from pixart_core.variants import DEFAULT_VARIANT, PRESETS, Variant, variant_from_name


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    dit_heads: int  # DiT width = heads x 72
    dit_layers: int
    dit_scale: float  # random init x this keeps outputs finite (28 random blocks overflow otherwise)
    t5_width: int
    t5_ff: int
    t5_heads: int
    t5_kv: int
    t5_layers: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_sample_size: int | None  # None: as released (1024 SDXL, 512 SD)


SIZES = {s.name: s for s in [
    # T5 width a multiple of 64: bitsandbytes nf4 on CPU packs weights in 64-wide blocks
    Size("tiny", 2, 2, 0.5, 64, 128, 4, 16, 2, (32, 32, 32, 32), 1, 64),
    Size("bench", 16, 28, 0.2, 4096, 10240, 64, 64, 2, (128, 256, 512, 512), 2, None),
    Size("full", 16, 28, 0.2, 4096, 10240, 64, 64, 24, (128, 256, 512, 512), 2, None),
]}
TINY = SIZES["tiny"]
T5_WIDTH = TINY.t5_width  # the tests' caption width


def t5_config(size: str = "tiny", layers: int | None = None) -> dict:
    s = SIZES[size]
    return dict(vocab_size=32128, d_model=s.t5_width, d_kv=s.t5_kv, d_ff=s.t5_ff, num_layers=layers or s.t5_layers,
                num_heads=s.t5_heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


T5_CONFIG = t5_config()


def dit_config(size: str = "tiny", variant: str | Variant = DEFAULT_VARIANT, *, sample_size: int | None = None,
               interpolation_scale: float | None = None, micro: bool | None = None,
               layers: int | None = None) -> dict:
    """diffusers config of a DiT preset for a variant (keywords override single fields)."""
    s = SIZES[size]
    v = PRESETS[variant] if isinstance(variant, str) else variant
    config = core_dit.diffusers_config(v, heads=s.dit_heads, layers=layers or s.dit_layers, caption_channels=s.t5_width)
    for key, value in (("sample_size", sample_size), ("interpolation_scale", interpolation_scale),
                       ("use_additional_conditions", micro)):
        if value is not None:
            config[key] = value
    return config


def vae_config(size: str = "tiny", family: str | None = "sdxl", comfy_compatible: bool = False) -> dict:
    """comfy_compatible: the released architecture (ComfyUI's own VAELoader builds no other), at the preset's
    sample size."""
    s = SIZES[size]
    full = SIZES["full"]
    channels, layers = (full.vae_channels, full.vae_layers) if comfy_compatible else (s.vae_channels, s.vae_layers)
    return core_vae.diffusers_config(family, channels=channels, layers=layers, sample_size=s.vae_sample_size)


def make_t5(size: str = "tiny", seed: int = 0, layers: int | None = None):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**t5_config(size, layers))).eval()


def make_overflowing_t5():
    """A tiny T5 whose feed-forward outputs pass fp16's 65504, as T5-XXL's `wo` outputs do."""
    t5 = make_t5()
    with torch.no_grad():
        for block in t5.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wi_0.weight.mul_(8)
            ff.wi_1.weight.mul_(8)
            ff.wo.weight.mul_(800)
    return t5


def make_t5_from_config(config: dict | None = None, seed: int = 0):
    """A T5 encoder with random weights from a transformers T5 config (default: the tiny preset's)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**(config or T5_CONFIG))).eval()


def make_dit(size: str = "tiny", seed: int = 0, variant: str | Variant = DEFAULT_VARIANT, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**dit_config(size, variant, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(SIZES[size].dit_scale)
    return model


def make_vae(size: str = "tiny", seed: int = 0, comfy_compatible: bool = False, family: str | None = "sdxl"):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config(size, family, comfy_compatible)).eval()


def variant_for(name: str) -> Variant:
    """The variant a file name names (pixart_core's rules), else the default one."""
    return variant_from_name(name) or PRESETS[DEFAULT_VARIANT]


def vae_family_for(name: str) -> str:
    return core_vae.family_from_name(name) or "sdxl"


# ------------------------------------------------------------------------------------------ the layouts users have

def t5_single_file_sd(model, dtype=torch.float16, prefix: str = "") -> dict[str, torch.Tensor]:
    """As ComfyUI users' t5xxl_fp16.safetensors: encoder keys + shared.weight, no tied duplicate."""
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return {prefix + k: v for k, v in sd.items()}


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value (torch.finfo(torch.float8_e4m3fn).max)


def t5_scaled_fp8_sd(model, scales: bool = True) -> dict[str, torch.Tensor]:
    """As ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors: each Linear weight stored as float8_e4m3fn of
    weight / scale_weight with a float32 per-tensor `scale_weight` (the real weight is fp8 * scale, comfy/ops.py
    scaled_fp8_ops convert_weight; set_weight divides by the scale before rounding to fp8), here amax / 448 so the
    largest weight lands on e4m3's largest value; embedding, norms and relative attention bias in fp16; the empty
    `scaled_fp8` marker whose dtype names the fp8 type (comfy/text_encoders/sd3_clip.py t5_xxl_detect).
    `scales=False` leaves the scales out (a broken file)."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in t5_single_file_sd(model, torch.float32).items():
        if v.ndim == 2 and not k.endswith(("shared.weight", "relative_attention_bias.weight")):
            scale = (v.abs().max() / FP8_MAX).clamp(min=1e-12).to(torch.float32)
            out[k] = (v / scale).to(torch.float8_e4m3fn).contiguous()
            if scales:
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.half().contiguous()
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> original (LDM) keys, as in sdxl_vae.safetensors."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out = {}
    for k, v in sd.items():
        n = k
        for a, b in (("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"),
                     ("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                     ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"),
                     ("mid_block.attentions.0.to_q", "mid.attn_1.q"), ("mid_block.attentions.0.to_k", "mid.attn_1.k"),
                     ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
                     ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"),
                     ("downsamplers.0.conv", "downsample.conv"), ("upsamplers.0.conv", "upsample.conv")):
            n = n.replace(a, b)
        parts = n.split(".")
        if parts[1] == "down_blocks":
            parts[1] = "down"
        if parts[1] == "up_blocks":
            parts[1], parts[2] = "up", str(n_up - 1 - int(parts[2]))
        if len(parts) > 3 and parts[3] == "resnets":
            parts[3] = "block"
        n = ".".join(parts)
        if "attn_1" in n and n.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[n] = v.contiguous()
    return out


def dit_to_original(sd: dict[str, torch.Tensor], pos_embed: torch.Tensor | None = None,
                    y_embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """diffusers PixArt keys -> the original PixArt release's keys (fused qkv and kv), written from DESIGN.md §3.
    The original also stores a sin-cos `pos_embed` table and the learned null caption `y_embedding`, which
    diffusers does not keep: small zero ones unless given."""
    out = {}
    top = {"pos_embed.proj.": "x_embedder.proj.", "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
           "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
           "adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
           "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
           "adaln_single.emb.resolution_embedder.linear_1.": "csize_embedder.mlp.0.",
           "adaln_single.emb.resolution_embedder.linear_2.": "csize_embedder.mlp.2.",
           "adaln_single.emb.aspect_ratio_embedder.linear_1.": "ar_embedder.mlp.0.",
           "adaln_single.emb.aspect_ratio_embedder.linear_2.": "ar_embedder.mlp.2.",
           "adaln_single.linear.": "t_block.1.", "proj_out.": "final_layer.linear.",
           "scale_shift_table": "final_layer.scale_shift_table"}
    block = {"attn1.to_out.0.": "attn.proj.", "attn2.to_q.": "cross_attn.q_linear.", "attn2.to_out.0.": "cross_attn.proj.",
             "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.", "scale_shift_table": "scale_shift_table"}
    for k, v in sd.items():
        if k.startswith("transformer_blocks."):
            _, n, rest = k.split(".", 2)
            kind = rest.rsplit(".", 1)[-1]
            if rest.startswith("attn1.to_q."):
                out[f"blocks.{n}.attn.qkv.{kind}"] = torch.cat([sd[f"transformer_blocks.{n}.attn1.to_{c}.{kind}"] for c in "qkv"])
            elif rest.startswith("attn2.to_k."):
                out[f"blocks.{n}.cross_attn.kv_linear.{kind}"] = torch.cat([sd[f"transformer_blocks.{n}.attn2.to_{c}.{kind}"] for c in "kv"])
            elif not rest.startswith(("attn1.to_k.", "attn1.to_v.", "attn2.to_v.")):
                o = next(o for d, o in block.items() if rest.startswith(d))
                out[f"blocks.{n}.{o}{rest[len(next(d for d in block if rest.startswith(d))):]}"] = v
        else:
            d = next(d for d in top if k.startswith(d))
            out[top[d] + k[len(d):]] = v
    width = sd["pos_embed.proj.weight"].shape[0]
    out["pos_embed"] = torch.zeros(1, 4, width) if pos_embed is None else pos_embed  # diffusers recomputes it
    caption = sd["caption_projection.linear_1.weight"].shape[1]
    out["y_embedder.y_embedding"] = torch.zeros(120, caption) if y_embedding is None else y_embedding
    return {k: v.contiguous() for k, v in out.items()}



DIT_LAYOUTS = ("original-pth", "original-pth-wrapped", "original-safetensors", "diffusers-single", "comfyui-prefixed",
               "diffusers-folder")


def write_dit(folder: Path, layout: str, name: str, model) -> Path:
    """The DiT saved into `folder` as `name` in one of the layouts users have (DIT_LAYOUTS: the original release's
    .pth, bare or under "state_dict", and safetensors; diffusers keys in one file; the original keys under ComfyUI's
    model.diffusion_model. prefix; a diffusers folder); returns the file or folder."""
    from safetensors.torch import save_file

    sd = model.state_dict()
    if layout == "original-pth":
        path = folder / f"{name}.pth"
        torch.save(dit_to_original(sd), path)
    elif layout == "original-pth-wrapped":
        path = folder / f"{name}.pth"
        torch.save({"state_dict": dit_to_original(sd)}, path)
    elif layout == "original-safetensors":
        path = folder / f"{name}.safetensors"
        save_file(dit_to_original(sd), str(path))
    elif layout == "diffusers-single":
        path = folder / f"{name}.safetensors"
        save_file(sd, str(path))
    elif layout == "comfyui-prefixed":
        path = folder / f"{name}.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in dit_to_original(sd).items()}, str(path))
    elif layout == "diffusers-folder":
        path = folder / name
        model.save_pretrained(path / "transformer")
    else:
        raise ValueError(f"unknown DiT layout {layout!r}; one of {DIT_LAYOUTS}")
    return path

def copy_tokenizer(comfy_path: Path, dest: Path) -> None:
    """ComfyUI's own T5 tokenizer (comfy/text_encoders/t5_tokenizer) into a folder."""
    shutil.copytree(Path(comfy_path) / "comfy" / "text_encoders" / "t5_tokenizer", dest, dirs_exist_ok=True)


def write_models(models: Path, comfy_path: Path) -> dict[str, object]:
    """The tests' set: each tiny model once as a single file and once in a diffusers pipeline folder, under a
    ComfyUI models/ folder; returns the models (same weights)."""
    from safetensors.torch import save_file

    for d in ("text_encoders", "checkpoints", "diffusion_models", "vae", "diffusers"):
        (models / d).mkdir(parents=True, exist_ok=True)
    t5, dit, vae = make_t5(), make_dit(), make_vae()
    save_file(t5_single_file_sd(t5), str(models / "text_encoders" / "tiny_t5xxl_fp16.safetensors"))
    save_file(dit.state_dict(), str(models / "checkpoints" / "tiny-PixArt-Sigma-XL-2-1024-MS.safetensors"))
    save_file(vae_to_ldm(vae.state_dict()), str(models / "vae" / "tiny_sdxl_vae.safetensors"))
    pipe = models / "diffusers" / "tiny-PixArt-Sigma-XL-2-1024-MS"
    t5.save_pretrained(pipe / "text_encoder")
    dit.save_pretrained(pipe / "transformer")
    vae.save_pretrained(pipe / "vae")
    copy_tokenizer(comfy_path, pipe / "tokenizer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    return {"t5": t5, "dit": dit, "vae": vae}


def write_t5_file(path: Path, size: str = "full", seed: int = 0, layers: int | None = None) -> None:
    """A T5 single file (fp16, encoder keys + shared) written one tensor at a time: the full 24-block T5-XXL
    (9.5 GB) never sits in memory. Random normal(0, 0.02) weights, layer norms 1."""
    c = t5_config(size, layers)
    d, ff, inner = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"]
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (c["vocab_size"], d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(c["num_layers"]):
        b = f"encoder.block.{i}.layer."
        for p in "qkv":
            shapes[f"{b}0.SelfAttention.{p}.weight"] = (inner, d)
        shapes[f"{b}0.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            shapes[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (c["relative_attention_num_buckets"],
                                                                           c["num_heads"])
        shapes[f"{b}0.layer_norm.weight"] = (d,)
        shapes[f"{b}1.DenseReluDense.wi_0.weight"] = (ff, d)
        shapes[f"{b}1.DenseReluDense.wi_1.weight"] = (ff, d)
        shapes[f"{b}1.DenseReluDense.wo.weight"] = (d, ff)
        shapes[f"{b}1.layer_norm.weight"] = (d,)
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    g = torch.Generator().manual_seed(seed)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k, shape in shapes.items():
            t = torch.ones(shape) if "layer_norm" in k else torch.randn(shape, generator=g) * 0.02
            f.write(t.half().numpy().tobytes())
    tmp.rename(path)

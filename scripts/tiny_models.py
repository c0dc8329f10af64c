"""Tiny PixArt/T5/VAE models with the real classes and random weights, saved in the layouts users have.

Used by the tests (as `tests/tiny.py`) and by the headless runner (scripts/run_workflow.py), which builds them when
the model files a workflow names are missing. Never imports ComfyUI or the pack."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

T5_WIDTH = 64  # a multiple of 64: bitsandbytes nf4 on CPU packs weights in 64-wide blocks
T5_CONFIG = dict(vocab_size=32128, d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


def dit_config(sample_size: int = 128, interpolation_scale: float = 2.0, micro: bool = False, layers: int = 2) -> dict:
    return dict(num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
                cross_attention_dim=144, attention_bias=True, sample_size=sample_size, patch_size=2,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=interpolation_scale,
                use_additional_conditions=micro, caption_channels=T5_WIDTH)


VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
                  act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025)


def make_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**T5_CONFIG)).eval()


def make_dit(seed: int = 0, **kw):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**dit_config(**kw)).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here; keep outputs in a sane range
        for p in model.parameters():
            p.mul_(0.5)
    return model


# ComfyUI's own VAELoader builds every SD/SDXL-style VAE with this fixed architecture (comfy/sd.py): a VAE that
# ComfyUI's VAE Encode/Decode must load cannot be smaller (83.7M parameters; random weights, but full size).
COMFY_VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=[128, 256, 512, 512], layers_per_block=2)


def make_vae(seed: int = 0, comfy_compatible: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**(COMFY_VAE_CONFIG if comfy_compatible else VAE_CONFIG)).eval()


def t5_single_file_sd(model, dtype=torch.float16, prefix: str = "") -> dict[str, torch.Tensor]:
    """As ComfyUI users' t5xxl_fp16.safetensors: encoder keys + shared.weight, no tied duplicate."""
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return {prefix + k: v for k, v in sd.items()}


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
    out["pos_embed"] = torch.zeros(1, 4, 144) if pos_embed is None else pos_embed  # diffusers recomputes it
    out["y_embedder.y_embedding"] = torch.zeros(120, T5_WIDTH) if y_embedding is None else y_embedding
    return {k: v.contiguous() for k, v in out.items()}


def copy_tokenizer(comfy_path: Path, dest: Path) -> None:
    src = comfy_path / "comfy" / "text_encoders" / "t5_tokenizer"
    shutil.copytree(src, dest, dirs_exist_ok=True)


def write_models(models: Path, comfy_path: Path) -> dict[str, object]:
    """Every tiny model in every layout the foundation supports, under a ComfyUI models/ folder."""
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


KINDS = ("t5", "dit", "vae")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FILE_SUFFIXES = (".safetensors", ".sft", *PICKLE_SUFFIXES)


def _is_alpha_1024(name: str) -> bool:
    """Only PixArt-alpha 1024-MS has the micro-conditioning embedders (PixArt-XL-2-1024-MS.pth)."""
    low = name.lower().replace("_", "-")
    return "sigma" not in low and ("alpha" in low or "pixart-xl-2" in low) and "1024" in low


def _vae_scaling(name: str) -> float:
    low = name.lower()
    return 0.18215 if any(w in low for w in ("ft-mse", "ft-ema", "sd15", "sd-vae", "alpha")) else 0.13025


def write_tiny(kind: str, dest: Path, comfy_path: Path, comfy_vae: bool = False) -> Path:
    """One tiny random model of `kind` at `dest`, in the layout the name implies: a diffusers folder when `dest`
    has no weight-file suffix, the original key layout for .pth/.pt/.ckpt DiTs, LDM keys for single-file VAEs.

    `comfy_vae` gives the VAE ComfyUI's fixed architecture, for workflows that also load it with ComfyUI's
    VAELoader. Deterministic (seed 0): the same name always gives the same weights.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r} (one of {KINDS})")
    dest = Path(dest)
    suffix = dest.suffix.lower() if dest.suffix.lower() in FILE_SUFFIXES else ""
    pickled = suffix in PICKLE_SUFFIXES  # read back with torch.load (by ComfyUI and by the pack)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "t5":
        t5 = make_t5()
        if suffix:
            save_file(t5_single_file_sd(t5), str(tmp))
        else:
            t5.save_pretrained(tmp / "text_encoder")
            copy_tokenizer(comfy_path, tmp / "tokenizer")
    elif kind == "dit":
        dit = make_dit(micro=_is_alpha_1024(dest.name))
        if not suffix:
            dit.save_pretrained(tmp / "transformer")
        elif suffix in (".pth", ".pt", ".ckpt"):  # the original release's format
            torch.save(dit_to_original(dit.state_dict()), str(tmp))
        elif pickled:  # .bin: diffusers keys, as diffusion_pytorch_model.bin
            torch.save(dit.state_dict(), str(tmp))
        else:
            save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp))
    else:
        vae = make_vae(comfy_compatible=comfy_vae)
        vae.register_to_config(scaling_factor=_vae_scaling(dest.name))
        if suffix:
            ldm = vae_to_ldm({k: v.half() for k, v in vae.state_dict().items()})
            if pickled:
                torch.save(ldm, str(tmp))
            else:
                save_file(ldm, str(tmp))
        else:
            vae.save_pretrained(tmp / "vae")
    if not suffix and dest.is_dir():  # a pipeline folder another kind wrote first: add this kind's parts
        for part in tmp.iterdir():
            shutil.rmtree(dest / part.name, ignore_errors=True)
            part.replace(dest / part.name)
        tmp.rmdir()
        return dest
    tmp.replace(dest)  # atomic: a half-written model is never picked up
    return dest


COMPONENTS = {"t5": "text_encoder", "dit": "transformer", "vae": "vae"}  # a diffusers pipeline folder's parts


def has_tiny(kind: str, dest: Path) -> bool:
    """Whether `dest` already holds a tiny `kind` (for a pipeline folder: that kind's part)."""
    dest = Path(dest)
    return (dest / COMPONENTS[kind]).is_dir() if dest.suffix.lower() not in FILE_SUFFIXES else dest.exists()

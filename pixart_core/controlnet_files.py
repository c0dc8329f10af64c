"""Reading PixArt ControlNet files: the authors' whole checkpoint (PixArt-XL-2-1024-ControlNet.pth: `base_model.*` +
`controlnet.{i}.*` in the original block layout), adapter files (diffusers research project / SimpleTuner layout) and
adapter folders; and the check that an adapter fits the DiT it is applied to."""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from . import files
from . import transformer as core_dit
from .controlnet import ANCHOR, AdapterConfig, ControlNetAdapter, config_from_state_dict
from .logs import logger_name
from .meta import assign_state_dict, empty_weights
from .variants import PRESETS, Variant

log = logging.getLogger(logger_name(__name__))

# The authors' layout (PixArt-alpha diffusion/model/nets/pixart_controlnet.py, ControlPixArtHalf): `controlnet` is a
# ModuleList of ControlT2IDitBlockHalf, each a `copied_block` (an original PixArt block), `after_proj`, and in block 0
# `before_proj`; the frozen DiT is `base_model`.
ORIGINAL_ANCHOR = "controlnet.0.after_proj.weight"
_ORIGINAL_BLOCK = re.compile(r"(^|\.)controlnet\.\d+\.copied_block\.")
_ORIGINAL_KEY = re.compile(r"controlnet\.(\d+)\.(copied_block|before_proj|after_proj)\.(.+)$")
ADAPTER_CLASSES = (None, "PixArtControlNetAdapterModel", "PixArtSigmaControlNetAdapterModel")
_WHAT_TO_LOAD = ("Choose a PixArt ControlNet in models/controlnet: the authors' PixArt-XL-2-1024-ControlNet.pth "
                 "(or -512-), an adapter .safetensors (controlnet_blocks.*), or an adapter folder with config.json.")


def is_original_layout(keys: Iterable[str]) -> bool:
    """The authors' whole-checkpoint keys (controlnet.{i}.copied_block.*)."""
    return any(_ORIGINAL_BLOCK.search(k) for k in keys)


def convert_original(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The authors' control keys (controlnet.{i}.copied_block/before_proj/after_proj.*, prefix stripped) -> the adapter
    layout: copied blocks as the DiT's blocks are converted (fused attn.qkv and cross_attn.kv_linear split,
    mlp.fc1/fc2 -> ff.net.0.proj/ff.net.2, attn.proj -> attn1.to_out.0, cross_attn.* -> attn2.*). Fails naming
    every key it does not know."""
    out: dict[str, torch.Tensor] = {}
    copied: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        m = _ORIGINAL_KEY.match(key)
        if m is None:
            unknown.append(key)
        elif m.group(2) == "copied_block":
            copied[f"blocks.{m.group(1)}.{m.group(3)}"] = value
        else:
            out[f"controlnet_blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
    if unknown:
        raise files.WeightFileError(
            f"{name}: {len(unknown)} keys of this PixArt ControlNet checkpoint are not control-block keys "
            f"(e.g. {', '.join(sorted(unknown)[:4])}); it may be a ControlNet this loader does not support yet.")
    try:
        blocks = core_dit.convert_original(copied, name)
    except files.WeightFileError as e:
        raise files.WeightFileError(f"{e} (in the control blocks, controlnet.N.copied_block.*)") from e
    for key, value in blocks.items():
        _, n, rest = key.split(".", 2)  # transformer_blocks.N.rest
        out[f"controlnet_blocks.{n}.transformer_block.{rest}"] = value
    return out


def base_variant(shapes: dict[str, tuple[int, ...]]) -> Variant | None:
    """The PixArt variant of the DiT stored beside the control blocks (the checkpoint's `base_model.*`, original
    layout, prefix stripped): α/Σ from the null caption's token count (120/300), the trained size from the stored
    position table, micro-conditioning from the size embedders. None when the shapes do not tell."""
    micro = any(k.startswith("csize_embedder.") for k in shapes)
    tokens = shapes.get("y_embedder.y_embedding", (None,))[0]
    family = {120: "alpha", 300: "sigma"}.get(tokens) if tokens is not None else ("alpha" if micro else None)
    pos, proj = shapes.get("pos_embed"), shapes.get("x_embedder.proj.weight")
    sample_size = None
    if pos is not None and proj is not None and len(pos) == 3:
        side = round(pos[1] ** 0.5)
        sample_size = side * proj[-1] if side * side == pos[1] else None
    if sample_size is not None:  # the stored table is the size it was trained at, whatever embedders it carries
        return next((v for v in PRESETS.values() if v.family == family and v.sample_size == sample_size), None)
    return PRESETS["alpha-1024"] if micro else None  # only α-1024-MS has the size embedders


def describe(keys: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """What a file that is not a PixArt ControlNet looks like, with the ControlNets of other models named."""
    keys = list(keys)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("controlnet_cond_embedding") or has("input_hint_block"):
        xl = has("add_embedding.") or has("label_emb.")
        return (f"a Stable Diffusion {'XL' if xl else '1.x/2.x'} ControlNet (for a UNet), which does not fit "
                "PixArt's transformer")
    if any(re.search(r"controlnet_(single_)?blocks\.\d+\.weight$", k) for k in keys):
        return "a ControlNet for another transformer (SD3/Flux style: its control blocks are single linears)"
    return files.describe(keys, shapes)


def _control_part(sd: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], Variant | None, str]:
    """The adapter-layout control weights of a read file, the base variant it names, and its layout in words."""
    if is_original_layout(sd):
        sd = files.strip_prefix(sd, ORIGINAL_ANCHOR)
        control = {k: v for k, v in sd.items() if k.startswith("controlnet.")}
        base = {k[len("base_model."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("base_model.")}
        other = sorted(k for k in sd if not k.startswith(("controlnet.", "base_model.")))
        if other:
            log.warning("PixArt ControlNet %s: ignoring %d keys outside controlnet.* and base_model.* (e.g. %s).",
                        name, len(other), ", ".join(other[:3]))
        return convert_original(control, name), base_variant(base), "the authors' checkpoint (original layout)"
    if any(k.endswith(ANCHOR) for k in sd):
        return files.strip_prefix(sd, ANCHOR), None, "adapter layout"
    looks = describe(sd, files.shapes_of(sd))
    dit = " (load it with the PixArt DiT loader; a ControlNet goes beside it)" if "PixArt transformer" in looks else ""
    raise files.WeightFileError(f"{name}: this is not a PixArt ControlNet; it looks like {looks}{dit}. {_WHAT_TO_LOAD}")


def _folder(path: Path) -> tuple[dict[str, torch.Tensor], int | None, str]:
    """An adapter folder's weights, the head count its config.json gives (None: not given), and its name."""
    wdir = files.component_folder(path, "controlnet", "PixArt ControlNet adapter")
    files.check_folder(wdir)
    config = json.loads((wdir / "config.json").read_text())
    if config.get("_class_name") not in ADAPTER_CLASSES:
        raise files.WeightFileError(f"{wdir}: config.json describes a {config.get('_class_name')}, not a PixArt "
                                    f"ControlNet adapter. {_WHAT_TO_LOAD}")
    weights = next((wdir / f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                    if (wdir / f).is_file()), None)
    if weights is None:
        raise files.WeightFileError(f"{wdir}: no diffusion_pytorch_model.safetensors in this folder.")
    sd = files.read_state_dict(weights)
    if not any(k.endswith(ANCHOR) for k in sd):
        raise files.WeightFileError(f"{wdir}: the weights are not a PixArt ControlNet adapter; they look like "
                                    f"{describe(sd, files.shapes_of(sd))}. {_WHAT_TO_LOAD}")
    sd = files.strip_prefix(sd, ANCHOR)
    layers = config.get("num_layers")
    blocks = len({k.split(".")[1] for k in sd if k.startswith("controlnet_blocks.")})
    if layers is not None and layers != blocks:
        raise files.WeightFileError(f"{wdir}: config.json says {layers} control blocks, the weights hold {blocks}. "
                                    "The folder is incomplete or mixed: download it again.")
    return sd, config.get("num_attention_heads"), path.name


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32
                    ) -> tuple[ControlNetAdapter, Variant | None, str]:
    """Load a PixArt ControlNet (the authors' .pth/.safetensors checkpoint, an adapter file, or an adapter folder)
    on the CPU, only its control part. Returns (adapter, the variant of the DiT it was trained with if the file
    tells (the authors' checkpoints do), what the file was)."""
    path = Path(path)
    heads = None
    if path.is_dir():
        sd, heads, name = _folder(path)
        variant, layout = None, "adapter folder"
    else:
        name = path.name
        # no dtype here: a whole checkpoint is memory-mapped and its base DiT is never converted (or read)
        sd, variant, layout = _control_part(files.read_state_dict(path), name)
    config = config_from_state_dict(sd, name, heads)
    with empty_weights():
        adapter = ControlNetAdapter(config)
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    what = f"a PixArt ControlNet adapter ({config.blocks} blocks, {config.width} wide)"
    files.check_keys(name, sd, expected, what)
    files.check_shapes(name, files.shapes_of(sd), expected, what)
    ints = sorted(k for k, v in sd.items() if not v.is_floating_point())  # the adapter has no integer tensors
    if ints:
        raise files.WeightFileError(f"{name}: {len(ints)} tensors are not floating point (e.g. {ints[0]} is "
                                    f"{sd[ints[0]].dtype}); quantized ControlNets are not supported: use its "
                                    "fp32/fp16/bf16 file.")
    assign_state_dict(adapter, {k: v.to(dtype) for k, v in sd.items()})
    log.info("PixArt ControlNet %s: %s, %d control blocks, %d wide%s.", name, layout, config.blocks, config.width,
             f", trained with {variant.name}" if variant else "")
    return adapter.eval().requires_grad_(False), variant, layout


def check_base(config: AdapterConfig, dit_config, name: str, base: Variant | None = None,
               dit_variant: Variant | None = None) -> None:
    """Refuse an adapter that does not fit the DiT (diffusers config `dit_config`): another width or head count,
    more control blocks than the DiT has blocks after its first, or another variant than the file was trained with."""
    width = dit_config.num_attention_heads * dit_config.attention_head_dim
    if config.width != width or config.heads != dit_config.num_attention_heads:
        raise ValueError(
            f"{name}: this ControlNet is {config.width} wide ({config.heads} heads), the DiT is {width} wide "
            f"({dit_config.num_attention_heads} heads): it belongs to another PixArt model. Load the DiT it was "
            "trained with (PixArt XL/2 ControlNets are 1152 wide).")
    if config.blocks > dit_config.num_layers - 1:
        raise ValueError(
            f"{name}: this ControlNet has {config.blocks} control blocks; a DiT of {dit_config.num_layers} blocks "
            f"takes at most {dit_config.num_layers - 1} (they act before blocks 1..N). Load the DiT it was trained with.")
    if base is not None and dit_variant is not None and base.name != dit_variant.name:
        raise ValueError(
            f"{name}: this ControlNet was trained with PixArt {base.name}, but the DiT is loaded as {dit_variant.name}. "
            f"Load the {base.name} DiT (for the authors' 1024 ControlNet: PixArt-XL-2-1024-MS.pth; for the 512 one: "
            "PixArt-XL-2-512x512.pth), or set the DiT loader's variant.")

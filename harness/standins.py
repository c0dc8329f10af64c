"""Tiny stand-ins: a tiny random model (harness.models, preset "tiny") under the name a workflow uses, in the
layout that name implies, so a workflow runs without the real files (the image is then noise).

Used by the runner when a workflow names files that are missing, and by the example servers (tests, thumbnails),
whose models/ holds a stand-in at every official file name the downloader knows."""
from __future__ import annotations

import logging
import os
import shutil
import zlib
from pathlib import Path

import torch

from . import lora_files, models
from .download import CATALOG
from .location import REPO, comfyui_path

log = logging.getLogger(__name__)
TINY_DIR = REPO / ".cache" / "tiny-models" / "v2"  # bump when what write_tiny writes changes
TINY_PREFIX = "tiny-random-"
KINDS = ("t5", "dit", "vae", "lora", "controlnet")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FILE_SUFFIXES = (".safetensors", ".sft", *PICKLE_SUFFIXES, ".gguf")
COMPONENTS = {"t5": "text_encoder", "dit": "transformer", "vae": "vae",  # a diffusers pipeline folder's parts
              "controlnet": "controlnet"}  # (a ControlNet adapter folder: in models/controlnet, its own subfolder)
FOLDERS = {"t5": "text_encoders", "dit": "checkpoints", "vae": "vae", "lora": "loras",  # where a single file of each kind goes
           "controlnet": "controlnet"}
KIND_BY_FOLDER = {"text_encoders": "t5", "checkpoints": "dit", "diffusion_models": "dit", "vae": "vae", "loras": "lora",
                  "controlnet": "controlnet"}
COMFY_VAES = {"sdxl_vae.safetensors"}  # also loaded by ComfyUI's own VAELoader in the img2img example
# The LoRA files the example workflows name (no official PixArt LoRA to download: the user picks their own).
EXAMPLE_LORAS = ("pixart-sigma-style-lora.safetensors", "pixart-sigma-detail-lora.safetensors")
# Models the examples name that the downloader does not fetch (paths under models/): the community two-stage
# PixArt-Σ 900M v0.7 (diffusers folders, as published on the hub by terminusresearch; download them yourself).
EXAMPLE_ONLY = (("dit", "diffusers/pixart-900m-1024-ft-v0.7-stage1"), ("dit", "diffusers/pixart-900m-1024-ft-v0.7-stage2"))


def tiny_name(value: str, comfy_vae: bool = False) -> str:
    """The stand-in's name: the name (so a diffusers folder or a .pth keeps its layout and the variant hints in
    it), marked as tiny; a VAE that ComfyUI's own VAELoader loads is a separate, full-size one."""
    return TINY_PREFIX + ("comfyvae-" if comfy_vae else "") + value


def is_file_name(name: str) -> bool:
    return Path(name).suffix.lower() in FILE_SUFFIXES


def write_tiny(kind: str, dest: Path, comfy_path: Path | None = None, comfy_vae: bool = False) -> Path:
    """One tiny random model of `kind` at `dest`, in the layout the name implies: a diffusers folder when `dest`
    has no weight-file suffix, the original key layout for .pth/.pt/.ckpt DiTs, LDM keys for single-file VAEs,
    a GGUF T5 (of the type in the name) for .gguf; a ControlNet as the authors' whole checkpoint for .pth files
    (an adapter file or folder otherwise) with one control block for the tiny DiT of the variant its name says;
    the variant (DiT, ControlNet) and VAE family from the name, by pixart_core's rules.

    `comfy_vae` gives the VAE ComfyUI's fixed architecture, for workflows that also load it with ComfyUI's
    VAELoader. Deterministic (seed 0): the same name always gives the same weights.
    """
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r} (one of {KINDS})")
    dest = Path(dest)
    suffix = dest.suffix.lower() if is_file_name(dest.name) else ""
    pickled = suffix in PICKLE_SUFFIXES  # read back with torch.load (by ComfyUI and by the pack)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "t5":
        t5 = models.make_t5()
        if suffix == ".gguf":  # the quantization type the name says (t5-v1_1-xxl-encoder-Q8_0.gguf), else Q8_0
            from .gguf_files import TYPES, write_t5_gguf

            file_type = next((t for t in TYPES if f"-{t.lower()}." in dest.name.lower()), "Q8_0")
            write_t5_gguf(t5, tmp, file_type)
        elif suffix:
            save_file(models.t5_single_file_sd(t5), str(tmp))
        else:
            t5.save_pretrained(tmp / "text_encoder")
            models.copy_tokenizer(comfy_path or comfyui_path(), tmp / "tokenizer")
    elif kind == "lora":  # a kohya LoRA for the tiny DiT; its weights from the name, so two names differ
        if suffix != ".safetensors":
            raise ValueError(f"{dest.name}: tiny LoRA stand-ins are .safetensors files")
        save_file(lora_files.standin_lora(seed=zlib.crc32(dest.name.encode())), str(tmp))
    elif kind == "controlnet":
        _write_controlnet(dest.name, suffix, tmp)
    elif kind == "dit":
        dit = models.make_dit(variant=models.variant_for(dest.name))
        if not suffix:
            dit.save_pretrained(tmp / "transformer")
        elif suffix in (".pth", ".pt", ".ckpt"):  # the original release's format
            torch.save(models.dit_to_original(dit.state_dict()), str(tmp))
        elif pickled:  # .bin: diffusers keys, as diffusion_pytorch_model.bin
            torch.save(dit.state_dict(), str(tmp))
        else:
            save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp))
    else:
        vae = models.make_vae(comfy_compatible=comfy_vae, family=models.vae_family_for(dest.name))
        if suffix:
            ldm = models.vae_to_ldm({k: v.half() for k, v in vae.state_dict().items()})
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


def _write_controlnet(name: str, suffix: str, tmp: Path) -> None:
    """A ControlNet for the tiny DiT stand-in of the variant `name` says (the same weights: seed 0), one control
    block (the tiny DiT's two blocks leave room for one); its own weights from the name."""
    from safetensors.torch import save_file

    from .controlnet_files import adapter_state_dict, authors_checkpoint, write_adapter_folder

    variant = models.variant_for(name)
    dit = models.make_dit(variant=variant)
    sd = adapter_state_dict(dit, models.TINY.dit_layers - 1, seed=zlib.crc32(name.encode()), noise=0.2)
    if suffix in PICKLE_SUFFIXES:  # the authors' release format
        torch.save(authors_checkpoint(dit, sd, caption_tokens=variant.max_tokens), str(tmp))
    elif suffix:
        save_file(sd, str(tmp))
    else:
        write_adapter_folder(tmp / COMPONENTS["controlnet"], sd)


def has_tiny(kind: str, dest: Path) -> bool:
    """Whether `dest` already holds a tiny `kind` (for a pipeline folder: that kind's part)."""
    dest = Path(dest)
    return dest.exists() if is_file_name(dest.name) else (dest / COMPONENTS[kind]).is_dir()


def provide(prompt: dict, missing: list[tuple[str, str, str, str]], comfy_vae_names: set[str]) -> list[str]:
    """Write (or reuse) a stand-in for each missing model reference (node id, input, kind, name), register the
    stand-in folders with ComfyUI's folder_paths, and point the prompt at them. Returns the names replaced."""
    import folder_paths

    replaced = []
    for nid, name, kind, value in missing:
        folder = FOLDERS[kind] if is_file_name(value) or kind == "controlnet" else "diffusers"
        comfy_vae = kind == "vae" and value in comfy_vae_names
        dest = TINY_DIR / folder / tiny_name(value, comfy_vae)
        if not has_tiny(kind, dest):  # write_tiny is atomic: what exists is whole
            log.info("building a tiny random %s for %s: %s", kind, value, dest)
            write_tiny(kind, dest, Path(folder_paths.__file__).parent, comfy_vae=comfy_vae)
        prompt[nid]["inputs"][name] = dest.name
        if value not in replaced:
            replaced.append(value)
    for folder in (*FOLDERS.values(), "diffusers"):
        (TINY_DIR / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(TINY_DIR / folder))
    return replaced


def example_base(base: Path, comfy_path: Path | None = None) -> Path:
    """A ComfyUI base directory whose models/ holds a stand-in at every official name the downloader knows (so
    the example workflows need no substitution and the frontend sees valid choices), the pack in custom_nodes/,
    and ComfyUI's example.png in input/."""
    from .comfyui import make_base

    comfy_path = Path(comfy_path or comfyui_path())
    base = make_base(base)
    models_dir = base / "models"
    if not models_dir.exists():  # built once, into the stand-in cache
        cache = TINY_DIR / "official-names"
        for entry in CATALOG.values():
            local = Path(entry.files[0][1])
            if local.parts[0] == "diffusers":  # a diffusers folder: models/diffusers/<name>/{transformer,...}
                kind, dest = "dit", cache / "diffusers" / local.parts[1]
            else:
                kind, dest = KIND_BY_FOLDER[local.parts[0]], cache / local
            if not dest.exists():
                write_tiny(kind, dest, comfy_path, comfy_vae=entry.name in COMFY_VAES)
        for name in EXAMPLE_LORAS:
            if not (cache / "loras" / name).exists():
                write_tiny("lora", cache / "loras" / name, comfy_path)
        for kind, local in EXAMPLE_ONLY:
            if not (cache / local).exists():
                write_tiny(kind, cache / local, comfy_path)
        models_dir.symlink_to(cache, target_is_directory=True)
    example = comfy_path / "input" / "example.png"
    if example.is_file() and not (base / "input" / "example.png").exists():
        (base / "input" / "example.png").write_bytes(example.read_bytes())
    return base

"""Model file and folder lists for the loader widgets, from ComfyUI's folder_paths."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths

WEIGHT_EXT = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")
COMFY_TOKENIZER = Path(folder_paths.__file__).parent / "comfy" / "text_encoders" / "t5_tokenizer"  # shipped by ComfyUI
# Quantized T5s, written once (pixart_core.t5_cache). In models/ because it must survive restarts (ComfyUI wipes its
# temp folder at every start) and sits on the disk that holds the models; not under models/text_encoders, whose
# files every text-encoder loader lists. extra_model_paths.yaml may point `pixart_t5_cache` elsewhere. (Not
# registered as a model folder by default: ComfyUI's model library would list the cache's files.)
T5_CACHE = "pixart_t5_cache"


def t5_cache_dir() -> Path:
    """The folder for quantized-T5 cache entries: the first `pixart_t5_cache` path configured, else models/."""
    configured = folder_paths.folder_names_and_paths.get(T5_CACHE)
    if configured and configured[0]:
        return Path(configured[0][0])
    return Path(folder_paths.models_dir) / T5_CACHE


def _diffusers_roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths("diffusers") if os.path.isdir(p)]


def diffusers_folders(subfolder: str) -> list[str]:
    """Folders under models/diffusers with `subfolder`/config.json (a pipeline) or config.json (a bare component)."""
    found = set()
    for root in _diffusers_roots():
        for d in sorted(root.iterdir()):
            if d.is_dir() and ((d / subfolder / "config.json").is_file() or (d / "config.json").is_file()):
                found.add(d.name)
    return sorted(found)


GGUF_EXT = (".gguf",)


def files(*folder_names: str, ext: tuple[str, ...] = WEIGHT_EXT) -> list[str]:
    names: set[str] = set()
    for folder in folder_names:
        names.update(n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(ext))
        extra = tuple(e for e in ext if e in GGUF_EXT)  # ComfyUI's own lists leave out .gguf files
        for root in folder_paths.get_folder_paths(folder) if extra else ():
            found, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
            names.update(folder_paths.filter_files_extensions(found, extra))
    return sorted(names)


def choices(folder_names: tuple[str, ...], subfolder: str, ext: tuple[str, ...] = WEIGHT_EXT) -> list[str]:
    """Widget options: weight files in the ComfyUI folders, then diffusers folders."""
    return files(*folder_names, ext=ext) + diffusers_folders(subfolder)


def model_folders(folder_names: tuple[str, ...], subfolder: str) -> list[str]:
    """Folders inside ComfyUI's model folders of these kinds that hold a diffusers component (config.json, in the
    folder itself or in `subfolder`/), e.g. a ControlNet adapter folder in models/controlnet."""
    found = set()
    for folder in folder_names:
        for root in folder_paths.get_folder_paths(folder):
            if not os.path.isdir(root):
                continue
            for d in sorted(Path(root).iterdir()):
                if d.is_dir() and ((d / "config.json").is_file() or (d / subfolder / "config.json").is_file()):
                    found.add(d.name)
    return sorted(found)


def resolve(name: str, folder_names: tuple[str, ...]) -> Path:
    """The file or diffusers folder a widget value names; a clear error if it vanished since listing."""
    for root in _diffusers_roots():
        if (root / name).is_dir():
            return root / name
    for folder in folder_names:
        full = folder_paths.get_full_path(folder, name)
        if full is not None:
            return Path(full)
        for root in folder_paths.get_folder_paths(folder):  # a folder listed by model_folders
            if (Path(root) / name).is_dir():
                return Path(root) / name
    where = " or ".join(f"models/{f}" for f in folder_names)
    raise FileNotFoundError(
        f"{name}: not found in {where} or models/diffusers. It may have been moved or deleted since the list was "
        "made: press 'r' (refresh) in ComfyUI and pick the file again."
    )

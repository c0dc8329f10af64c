"""The loader widgets' lists and the VAE job's tiling decision, on ComfyUI's own folder_paths and model management
in this process: diffusers component folders in a model folder (a ControlNet adapter folder in models/controlnet)
and when a VAE job tiles."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from harness import models as tiny
from harness.comfyui import pack


def test_model_folders_lists_the_diffusers_component_folders_of_every_root(comfy, tmp_path, monkeypatch):
    import folder_paths

    missing, first, second = tmp_path / "missing", tmp_path / "a", tmp_path / "b"
    for d in ("top", "nested/controlnet", "empty", "other/unet"):
        (first / d).mkdir(parents=True)
    (first / "top" / "config.json").write_text("{}")  # a component folder: config.json in it
    (first / "nested" / "controlnet" / "config.json").write_text("{}")  # a pipeline-like folder: <subfolder>/config.json
    (first / "other" / "unet" / "config.json").write_text("{}")  # another subfolder: not this kind
    (first / "loose.safetensors").write_text("")  # a file, not a folder
    (first / "file_with_config").write_text("")
    (second / "late").mkdir(parents=True)
    (second / "late" / "config.json").write_text("{}")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet",
                        ([str(missing), str(first), str(second)], {".safetensors"}))
    assert pack("nodes.comfy.paths").model_folders(("controlnet",), "controlnet") == ["late", "nested", "top"]


def test_a_vae_job_tiles_when_told_or_when_it_does_not_fit(comfy):
    """load_for: 'always' tiles, 'never' does not, 'auto' tiles only when the job needs more than ComfyUI says is
    free on the VAE's device (model_management.get_free_memory: this machine's RAM on the CPU)."""
    import comfy.model_management as mm

    jobs, loading, types_ = pack("nodes.vae_jobs"), pack("nodes.comfy.loading"), pack("nodes.types")
    cpu = torch.device("cpu")
    handle = types_.VAEHandle(loading.wrap(tiny.make_vae(), cpu, cpu), "tiny_sdxl_vae.safetensors", "sdxl")
    more_than_free = mm.get_free_memory(cpu) * 4
    for tiling, need, tiles in (("always", 1, True), ("never", more_than_free, False), ("auto", 1, False),
                                ("auto", more_than_free, True)):
        ready, tiled = jobs.load_for(handle, need, tiling)
        assert tiled == tiles, (tiling, need)
        assert ready.device == cpu


def test_auto_tiles_only_past_the_free_memory_comfyui_reports(comfy, monkeypatch):
    """The boundary, with ComfyUI's free-memory query patched to a fixed figure: a job that needs exactly what is free
    runs whole; one byte more tiles."""
    import comfy.model_management as mm

    jobs, loading, types_ = pack("nodes.vae_jobs"), pack("nodes.comfy.loading"), pack("nodes.types")
    cpu = torch.device("cpu")
    handle = types_.VAEHandle(loading.wrap(tiny.make_vae(), cpu, cpu), "tiny_sdxl_vae.safetensors", "sdxl")
    free = 3 * 2**30
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)
    assert jobs.load_for(handle, free, "auto")[1] is False
    assert jobs.load_for(handle, free + 1, "auto")[1] is True


def test_lists_and_lookups_follow_comfyuis_folders(comfy, tmp_path, monkeypatch):
    """files(): the weight files ComfyUI's own list has (its extensions filtered to ours) plus .gguf files, which
    ComfyUI's lists leave out, found below every root; choices(): those, then the diffusers folders holding the
    component; resolve(): a diffusers folder first, then a file ComfyUI finds, then a component folder, else the
    whole advice; t5_cache_dir(): the configured pixart_t5_cache path, else models/pixart_t5_cache."""
    import folder_paths

    paths = pack("nodes.comfy.paths")
    te, te2, diff = tmp_path / "te", tmp_path / "te2", tmp_path / "diffusers"
    (te / "sub").mkdir(parents=True)
    te2.mkdir()
    for f in ("t5.safetensors", "notes.txt", "sub/t5-q8.gguf", "UPPER.SAFETENSORS"):
        (te / f).write_text("")
    (te2 / "t5-q4.GGUF").write_text("")
    (te2 / ".git").mkdir()
    (te2 / ".git" / "stale.gguf").write_text("")  # below .git: left out, as ComfyUI's own lists leave it
    (te / "folder_t5" / "text_encoder").mkdir(parents=True)
    (te / "folder_t5" / "text_encoder" / "config.json").write_text("{}")
    for d in ("pipe/text_encoder", "bare", "other/unet"):
        (diff / d).mkdir(parents=True)
        (diff / d / "config.json").write_text("{}")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(te), str(te2)], set(folder_paths.supported_pt_extensions)))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(diff), str(tmp_path / "gone")], set()))
    folder_paths.filename_list_cache.clear()
    try:
        assert paths.files("text_encoders", ext=paths.WEIGHT_EXT) == ["UPPER.SAFETENSORS", "t5.safetensors"]
        assert paths.files("text_encoders", ext=paths.WEIGHT_EXT + paths.GGUF_EXT) == [
            "UPPER.SAFETENSORS", "sub/t5-q8.gguf", "t5-q4.GGUF", "t5.safetensors"]
        assert paths.diffusers_folders("text_encoder") == ["bare", "pipe"]
        assert paths.choices(("text_encoders",), "text_encoder") == ["UPPER.SAFETENSORS", "t5.safetensors", "bare",
                                                                    "pipe"]
        assert paths.resolve("pipe", ("text_encoders",)) == diff / "pipe"
        assert paths.resolve("t5.safetensors", ("text_encoders",)) == te / "t5.safetensors"
        assert paths.resolve("folder_t5", ("text_encoders",)) == te / "folder_t5"
        with pytest.raises(FileNotFoundError) as e:
            paths.resolve("gone.safetensors", ("text_encoders", "clip"))
        assert str(e.value) == ("gone.safetensors: not found in models/text_encoders or models/clip or models/diffusers. "
                                "It may have been moved or deleted since the list was made: press 'r' (refresh) in "
                                "ComfyUI and pick the file again.")
    finally:
        folder_paths.filename_list_cache.clear()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "pixart_t5_cache", ([str(tmp_path / "cache")], set()))
    assert paths.t5_cache_dir() == tmp_path / "cache"
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "pixart_t5_cache")
    assert paths.t5_cache_dir() == Path(folder_paths.models_dir) / "pixart_t5_cache"


def test_dit_loader_says_what_it_loaded(comfy, caplog):
    """The DiT Loader's text in the UI and the log: the file, the variant and how it was decided, its resolution family,
    token limit and VAE, as the Σ release publishes them for Σ-1024 ([Σ-repo] configs/pixart_sigma_config/
    PixArt_sigma_xl2_img1024_internalms.py; scripts/inference.py:156: 300 tokens; the SDXL VAE)."""
    import logging

    from harness.graphs import DIT_FILE

    caplog.set_level(logging.INFO)
    out = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaDiTLoader"].execute(dit_name=DIT_FILE, variant="auto", dtype="fp32")
    text = f"{DIT_FILE}: sigma-1024 (from the file name); 1024px family, 300 tokens, SDXL VAE"
    assert out.ui.as_dict() == {"text": (text,)}
    assert f"PixArt DiT {text}" in [r.getMessage() for r in caplog.records]
    handle = out.result[0]
    assert (handle.name, handle.detected, handle.variant.name) == (DIT_FILE, "from the file name", "sigma-1024")
    assert handle.patcher.model.inner.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False], ids=["cpu-native-bf16", "cpu-without-bf16"])
def test_dit_loader_auto_dtype_and_devices_are_comfyuis(comfy, monkeypatch, native):
    """dtype 'auto' on a CPU: bf16 where the CPU computes bf16 natively (AVX512-BF16/AMX), else fp32 (the rule of
    test_gpu_readiness' table, by hand from ComfyUI 0.3.75's); the patcher loads on ComfyUI's torch device and
    offloads to its UNet offload device."""
    import comfy.model_management as mm

    from harness.graphs import DIT_FILE

    dtypes = sys.modules[pack("nodes.comfy.devices").dtypes.__name__]
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda *a: {"avx512f"} | ({"avx512_bf16"} if native else set()))
    monkeypatch.setattr(dtypes.sys, "platform", "linux")
    dtypes.cpu_native_bf16.cache_clear()
    try:
        handle = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaDiTLoader"].execute(dit_name=DIT_FILE, variant="auto",
                                                                            dtype="auto").result[0]
    finally:
        dtypes.cpu_native_bf16.cache_clear()
    assert handle.patcher.model.inner.dtype == (torch.bfloat16 if native else torch.float32)
    assert (handle.patcher.load_device, handle.patcher.offload_device) == (mm.get_torch_device(),
                                                                           mm.unet_offload_device())

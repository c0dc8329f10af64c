"""The T5 loader's `device` input (default / cpu, as ComfyUI's CLIPLoader has), simulated on a meta-device GPU with
ComfyUI's own model management (the fake GPU: harness/fake_gpu.py)."""
from __future__ import annotations

import json

import pytest
import torch

from harness import models as tiny
from pixart_core.variants import DEFAULT_VARIANT, PRESETS
from harness.comfyui import pack
from harness.fake_gpu import CPU, META, GiB, fake_gpu

T5_FILE = "tiny_t5xxl_fp16.safetensors"


def _loaded_on(patcher, device) -> bool:
    import comfy.model_management as mm

    return any(m.model is patcher and m.device == device for m in mm.current_loaded_models)


@pytest.fixture
def gpu_text_encoder(monkeypatch):
    """ComfyUI on a machine whose text-encoder device is the (fake, meta) GPU, as on a CUDA machine."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "text_encoder_device", lambda: META)
    return mm


def _t5(device: str, quantization="none", dtype="auto"):
    text = pack("nodes.text")
    return text.T5Loader.execute(t5_name=T5_FILE, quantization=quantization, dtype=dtype, device=device).result[0]


def _dit_on_fake_gpu(management):
    patcher = management.wrap(tiny.make_dit(), META, CPU)
    management.use(patcher)
    return patcher


def test_device_input_is_clip_loaders_and_comes_last_and_optional(comfy):
    """The options and placement of ComfyUI's CLIPLoader `device` input (nodes.py CLIPLoader.INPUT_TYPES): an
    optional input after every existing widget, so workflows saved before it load unchanged."""
    import nodes

    from harness import comfyui

    clip = nodes.CLIPLoader.INPUT_TYPES()["optional"]["device"]
    info = comfyui.object_info(comfy, {"PixArtSigmaT5Loader"})["PixArtSigmaT5Loader"]
    assert info["input_order"]["required"] == ["t5_name", "quantization", "dtype"]
    assert info["input_order"]["optional"] == ["device"]
    kind, opts = info["input"]["optional"]["device"]
    assert kind == "COMBO" and opts["options"] == clip[0] == ["default", "cpu"]
    assert opts["default"] == "default"


def test_devices_follow_the_choice(comfy, gpu_text_encoder):
    """default: ComfyUI's text-encoder devices; cpu: load and offload device both the CPU (what CLIPLoader puts in
    model_options for device "cpu"), computing in what `auto` is on the CPU (ComfyUI never picks bf16 there)."""
    mm = gpu_text_encoder
    default = _t5("default", dtype="fp32")
    assert (default.patcher.load_device, default.patcher.offload_device) == (META, mm.text_encoder_offload_device())
    cpu = _t5("cpu")
    assert (cpu.patcher.load_device, cpu.patcher.offload_device) == (CPU, CPU)
    assert not mm.should_use_bf16(CPU) and cpu.dtype == torch.float32
    assert cpu.identity != default.identity  # embeddings computed on another device are cached apart


class _Evicting(Exception):
    pass


@pytest.fixture
def unloads(gpu_text_encoder, monkeypatch):
    """The models ComfyUI decides to unload (LoadedModel.model_unload, recorded before it runs; a model on the
    fake GPU cannot really move back, so the call stops there with _Evicting)."""
    mm = gpu_text_encoder
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(self.model)
        raise _Evicting

    monkeypatch.setattr(mm.LoadedModel, "model_unload", spy)
    return seen


@pytest.mark.parametrize("quantization", ["none", "8-bit (bitsandbytes)"])
def test_cpu_t5_encodes_without_evicting_the_gpu_dit(comfy, gpu_text_encoder, unloads, quantization):
    """A fake GPU with room for the DiT but not for the DiT and the T5: encoding with the cpu T5 unloads nothing and
    leaves the DiT loaded on the GPU (ComfyUI's current_loaded_models); the embeddings come back on the CPU. The
    default-device T5 in the same state makes ComfyUI unload the DiT (so the check can fail)."""
    mm = gpu_text_encoder
    management, text = pack("nodes.comfy.loading"), pack("nodes.text")
    text.EMBEDDINGS.clear()
    cpu_t5 = _t5("cpu", quantization)
    gpu_t5 = _t5("default", dtype="fp32")
    dit_size = management.wrap(tiny.make_dit(), META, CPU).model_size()
    total = mm.minimum_inference_memory() + dit_size + gpu_t5.patcher.model_size() // 2
    with fake_gpu(mm.VRAMState.NORMAL_VRAM, total):
        dit = _dit_on_fake_gpu(management)
        assert _loaded_on(dit, META)
        pos, neg = text.TextEncode.execute(t5=cpu_t5, positive="a red fox in the snow", negative="",
                                           max_tokens=300).result
        assert unloads == [], "encoding with the cpu T5 unloaded models"
        assert _loaded_on(dit, META), "encoding with the cpu T5 evicted the DiT from the GPU"
        assert _loaded_on(cpu_t5.patcher, CPU)
        assert pos.embeds.device == CPU and neg.embeds.device == CPU and torch.isfinite(pos.embeds).all()
        with pytest.raises(_Evicting):
            management.use(gpu_t5.patcher)  # what a default-device encode asks ComfyUI for
        assert unloads == [dit], "the contrast: the GPU T5 should have needed the DiT's memory"


class _ReachedDiT(Exception):
    pass


def test_sampler_moves_cpu_embeddings_to_its_device(comfy, gpu_text_encoder):
    """Conditioning from the cpu T5 reaches the DiT on the sampler's device (the fake GPU): a forward pre-hook
    records the device of encoder_hidden_states and the mask at the first DiT call."""
    mm = gpu_text_encoder
    management, text, sampler, types = (pack("nodes.comfy.loading"), pack("nodes.text"), pack("nodes.sampler"),
                                        pack("nodes.types"))
    text.EMBEDDINGS.clear()
    cpu_t5 = _t5("cpu")
    pos, neg = text.TextEncode.execute(t5=cpu_t5, positive="a red fox", negative="", max_tokens=300).result
    assert pos.embeds.device == CPU
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["encoder_hidden_states"].device
        seen["mask"] = kwargs["encoder_attention_mask"].device
        raise _ReachedDiT

    with fake_gpu(mm.VRAMState.NORMAL_VRAM, 24 * GiB):
        patcher = management.wrap(tiny.make_dit(), META, CPU)
        handle = types.DiTHandle(patcher, PRESETS[DEFAULT_VARIANT], "tiny", "test")
        patcher.model.inner.register_forward_pre_hook(hook, with_kwargs=True)
        with pytest.raises(_ReachedDiT):
            sampler.Sampler.execute(dit=handle, positive=pos, negative=neg, seed=0, steps=1, cfg=4.5,
                                    scheduler="dpm++ 2m", width=64, height=64, batch_size=1)
        assert _loaded_on(patcher, META)
    assert seen == {"embeds": META, "mask": META}


def test_workflow_saved_before_the_device_input_runs(comfy, executor):
    """A UI workflow saved before `device` existed (three T5 loader widget values) converts without a device input
    and runs in ComfyUI's executor with the default device."""
    from conftest import REPO
    from harness import comfyui
    from harness.workflow import ui_to_api

    wf = json.loads((REPO / "example_workflows" / "pixart_sigma_1024_t5_8bit.json").read_text())
    loader = next(n for n in wf["nodes"] if n["type"] == "PixArtSigmaT5Loader")
    loader["widgets_values"] = loader["widgets_values"][:3]
    prompt = ui_to_api(wf, comfyui.object_info(comfy, {n["type"] for n in wf["nodes"]}))
    inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == "PixArtSigmaT5Loader")
    assert "device" not in inputs and len(inputs) == 3
    from harness.graphs import graph

    old_api = graph(seed=5)  # an API prompt from before: no device input
    assert "device" not in old_api["1"]["inputs"]
    result = executor.run(old_api)
    assert result["ok"], result["error"]


def test_loader_quantizes_once_into_models_pixart_t5_cache(comfy, caplog):
    """The node's cache folder is ComfyUI's models/pixart_t5_cache (not a folder any loader lists): after one
    8-bit load it holds an entry made from the chosen file, and the next load reads it (the log says so)."""
    import logging
    from pathlib import Path

    import folder_paths

    source = Path(folder_paths.get_full_path("text_encoders", T5_FILE)).resolve()
    _t5("cpu", "8-bit (bitsandbytes)")
    cache = Path(folder_paths.models_dir) / "pixart_t5_cache"
    def source_of(entry: Path) -> str:
        return json.loads((entry / "manifest.json").read_text())["key"]["source"]

    # other tests may have cached this file in other dtypes too: one entry per (file, mode, dtype)
    assert str(source) in {source_of(d) for d in cache.iterdir() if (d / "manifest.json").is_file()}
    assert not any("pixart_t5_cache" in n for n in folder_paths.get_filename_list("text_encoders"))
    with caplog.at_level(logging.INFO):
        _t5("cpu", "8-bit (bitsandbytes)")
    said = "PixArt T5 cache: read "
    reads = [Path(m.split(said, 1)[1].split(" (", 1)[0]) for m in (r.getMessage() for r in caplog.records) if said in m]
    assert len(reads) == 1 and reads[0].parent == cache and source_of(reads[0]) == str(source), reads

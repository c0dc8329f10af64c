"""The Text Encode node inside ComfyUI: its embedding cache serves nothing stale, the token limit follows the DiT
(120 for PixArt-α, 300 for Σ), each prompt is cleaned once per encode, and workflows saved before caption_cleaning
existed still load and run."""
from __future__ import annotations

import sys
import uuid

import torch
from safetensors.torch import load_file, save_file

from cases import LONG_PROMPT as LONG
from harness import models as tiny

T5_FILE = "tiny_t5xxl_fp16.safetensors"
PASSES_PER_CLEANING = 2  # diffusers: _clean_caption twice per prompt


def _prompt(max_tokens, cleaning, positive=LONG, **kw):
    from harness.graphs import graph

    p = graph(positive=positive, save_latent=True, prefix=f"cache_{max_tokens}_{cleaning}", **kw)
    p["2"]["inputs"].update(max_tokens=max_tokens, caption_cleaning=cleaning)
    return p


def _latents(result, comfy_base) -> torch.Tensor:
    assert result["ok"], result["error"]
    info = result["outputs"]["8"]["latents"][0]
    return load_file(str(comfy_base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"]


def test_text_encode_cache_serves_nothing_stale(comfy, comfy_base):
    """Runs changing only max_tokens or caption_cleaning, one after the other (the pack's embedding cache warm), give
    what a fresh ComfyUI with an empty cache gives."""
    from conftest import Executor
    from harness.comfyui import clear_embeddings

    settings = [(300, "diffusers"), (120, "diffusers"), (120, "none"), (300, "none")]
    clear_embeddings(comfy)
    warm = Executor()
    in_sequence = [_latents(warm.run(_prompt(*s)), comfy_base) for s in settings]
    fresh = []
    for s in settings:
        clear_embeddings(comfy)
        fresh.append(_latents(Executor().run(_prompt(*s)), comfy_base))
    for s, a, b in zip(settings, in_sequence, fresh):
        assert torch.equal(a, b), f"{s}: a cached embedding of another setting was used"
    for i in range(len(settings)):
        for j in range(i + 1, len(settings)):
            assert not torch.equal(fresh[i], fresh[j]), (settings[i], settings[j])


def test_alpha_dit_reads_120_tokens_when_max_tokens_is_left_to_it(comfy, comfy_base):
    """max_tokens 0: a PixArt-α DiT samples from the prompt encoded at 120 tokens (its release's limit), exactly as
    with max_tokens 120; a Σ DiT from 300 tokens."""
    from conftest import Executor

    dit = tiny.make_dit(sample_size=64, interpolation_scale=1.0)
    save_file(dit.state_dict(), str(comfy_base / "models" / "checkpoints" / "tiny-PixArt-XL-2-512x512.safetensors"))
    save_file(tiny.vae_to_ldm(tiny.make_vae().state_dict()),
              str(comfy_base / "models" / "vae" / "tiny-vae-ft-mse-840000-ema-pruned.safetensors"))
    alpha = dict(dit="tiny-PixArt-XL-2-512x512.safetensors", vae="tiny-vae-ft-mse-840000-ema-pruned.safetensors")
    run = Executor().run
    auto = _latents(run(_prompt(0, "diffusers", **alpha)), comfy_base)
    at_120 = _latents(run(_prompt(120, "diffusers", **alpha)), comfy_base)
    at_300 = _latents(run(_prompt(300, "diffusers", **alpha)), comfy_base)
    assert torch.equal(auto, at_120) and not torch.equal(auto, at_300)
    sigma_auto = _latents(run(_prompt(0, "diffusers")), comfy_base)
    sigma_300 = _latents(run(_prompt(300, "diffusers")), comfy_base)
    assert torch.equal(sigma_auto, sigma_300)


def test_workflow_saved_before_caption_cleaning_still_loads_and_runs(comfy, executor):
    """A UI workflow saved before caption_cleaning existed (three Text Encode widget values, max_tokens 120) converts
    and validates in ComfyUI, with the default cleaning and its saved limit."""
    import json

    from conftest import REPO
    from harness import comfyui
    from harness.workflow import ui_to_api
    from harness.graphs import graph

    wf = json.loads((REPO / "example_workflows" / "pixart_alpha_512.json").read_text())
    enc = next(n for n in wf["nodes"] if n["type"] == "PixArtSigmaTextEncode")
    enc["widgets_values"] = [enc["widgets_values"][0], "", 120]  # as saved by the previous version
    prompt = ui_to_api(wf, comfyui.object_info(comfy, {n["type"] for n in wf["nodes"]}))
    inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == "PixArtSigmaTextEncode")
    assert inputs["max_tokens"] == 120 and "caption_cleaning" not in inputs
    old_api = graph(seed=31)  # an API prompt from before: no caption_cleaning input at all
    assert "caption_cleaning" not in old_api["2"]["inputs"]
    result = executor.run(old_api)
    assert result["ok"], result["error"]


def test_text_encode_cleans_each_prompt_once_at_every_limit(comfy, monkeypatch):
    """The cleaned text keys the embedding cache and is what T5 reads, at every token limit it encodes. diffusers'
    caption cleaning is one `_clean_caption` pass applied twice per prompt (PixArtSigmaPipeline._text_preprocessing:
    `text = self._clean_caption(text)` twice), so one cleaning of a prompt is two passes. The passes are counted on
    the pack's own `clean_caption`, which keeps running (the count wraps it)."""
    loader, encode = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"], comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTextEncode"]
    captions = sys.modules[encode.__module__].captions  # the pack's module, as ComfyUI imported it
    real, passes = captions.clean_caption, []

    def counted(caption: str) -> str:
        passes.append(caption)
        return real(caption)

    monkeypatch.setattr(captions, "clean_caption", counted)
    t5 = loader.execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    tag = uuid.uuid4().hex[:8]  # prompts no earlier encode cached
    positive = f"A Photo of a red fox {tag} " + " ".join(["cat"] * 200)  # over 120 tokens: encoded at 300 and 120
    negative = f"blurry {tag}"
    pos, neg = encode.execute(t5=t5, positive=positive, negative=negative, max_tokens=0,
                              caption_cleaning="diffusers").result
    assert 120 in pos.at_limit and pos.mask.shape[1] > 120  # both limits were encoded
    assert len(passes) == 2 * PASSES_PER_CLEANING, len(passes)
    passes.clear()
    again = encode.execute(t5=t5, positive=positive, negative=negative, max_tokens=0, caption_cleaning="diffusers")
    assert again.result[0] is pos  # read from the embedding cache, keyed by the cleaned text
    assert len(passes) == 2 * PASSES_PER_CLEANING, len(passes)


def _encode_node(comfy, t5, positive: str, max_tokens: int = 0):
    return comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTextEncode"].execute(t5=t5, positive=positive, negative="",
                                                                       max_tokens=max_tokens).result


def test_the_shorter_limits_encode_without_a_cut_off_warning(comfy, caplog):
    """max_tokens 0 with a prompt of about 150 tokens: it fits Σ's 300, so nothing is cut and nothing is said; the
    encoding at α's 120 (made because the prompt is longer) cuts it silently: α's DiT reads it, and the sampler says
    so when it uses it."""
    import logging

    t5 = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"].execute(t5_name=T5_FILE, quantization="none",
                                                                  dtype="auto").result[0]
    prompt = " ".join(["a red fox in the snow"] * 25) + f" {uuid.uuid4().hex}"  # not in the embedding cache
    caplog.set_level(logging.WARNING)
    positive, _ = _encode_node(comfy, t5, prompt)
    assert 120 < positive.mask.shape[1] <= 300 and 120 in positive.at_limit
    assert [r.getMessage() for r in caplog.records if "T5 takes" in r.getMessage()] == []


def test_a_t5_on_the_gpu_gets_its_tokens_there_and_gives_embeddings_on_comfyuis_intermediate_device(comfy,
                                                                                                    monkeypatch):
    """ComfyUI's text-encoder device is a (fake) GPU: the T5 loads there and the token ids go there too (on a real
    GPU, ids left on the CPU fail in the embedding); the conditioning comes back on ComfyUI's intermediate device
    (the CPU here, as with --cpu or the default), masks included."""
    import comfy.model_management as mm

    from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

    seen = []
    with comfy_sees(FakeCuda(1 << 40)):
        monkeypatch.setattr(mm, "text_encoder_device", lambda: CUDA)
        t5 = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"].execute(t5_name=T5_FILE, quantization="none",
                                                                      dtype="fp32").result[0]
        t5.patcher.model.inner.get_input_embeddings().register_forward_pre_hook(
            lambda m, args: seen.append(args[0].device))
        positive, negative = _encode_node(comfy, t5, f"a red fox {uuid.uuid4().hex}")
        assert {t.device for c in (positive, negative) for t in (c.embeds, c.mask)} == {mm.intermediate_device()}
    assert seen and set(seen) == {CUDA}


def test_the_t5_loader_logs_the_file_its_quantization_dtype_and_device(comfy, caplog):
    """One line per load naming what was loaded and how, as the widgets say it (ComfyUI runs on the CPU here, where
    `auto` is fp32 for T5)."""
    import logging

    caplog.set_level(logging.INFO)
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"]
    node.execute(t5_name="tiny_t5xxl_fp16.safetensors", quantization="none", dtype="auto")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PixArt T5 ")]
    assert lines == ["PixArt T5 tiny_t5xxl_fp16.safetensors loaded (none, torch.float32, runs on cpu)"]


def test_the_same_t5_file_in_another_dtype_is_encoded_anew(comfy):
    """The embedding cache tells T5s apart by dtype too: the same file loaded in fp32 and in bf16 encodes one prompt
    to different embeddings (bf16's rounding), each equal to its own T5's encoding, not the other's cached one."""
    loader = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"]
    prompt = f"a red fox in the snow {uuid.uuid4().hex}"  # not in the embedding cache
    fp32 = loader.execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    bf16 = loader.execute(t5_name=T5_FILE, quantization="none", dtype="bf16").result[0]
    first, _ = _encode_node(comfy, fp32, prompt)
    second, _ = _encode_node(comfy, bf16, prompt)
    assert not torch.equal(first.embeds, second.embeds)
    assert torch.allclose(first.embeds, second.embeds, rtol=0.05, atol=0.05)  # the same T5, rounded

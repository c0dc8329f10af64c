"""Checks that a wrong number fails: DiT passes per step, img2img noising for every scheduler, truncation by content,
the embedding-cache key, and the token limit that follows the DiT. Expected values come from diffusers,
transformers, the tokenizer or a hand computation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference_settings as reference
from harness import models as tiny
from conftest import COMFY
from pixart_core import conditioning, sampling, schedulers
from pixart_core import t5 as ct5

TOKENIZER = COMFY / "comfy" / "text_encoders" / "t5_tokenizer"
CPU = torch.device("cpu")
SIZE = 64


@pytest.fixture(scope="module")
def conds():
    torch.manual_seed(3)
    pos = conditioning.Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] * 9 + [0] * 3]))
    neg = conditioning.Conditioning(torch.randn(1, 12, tiny.T5_WIDTH), torch.tensor([[1] + [0] * 11]))
    return pos, neg


@pytest.fixture(scope="module")
def tokenizer():
    return ct5.load_tokenizer([TOKENIZER])


def _record_calls(dit) -> tuple[list, object]:
    """Every DiT forward's latent input and timestep, as the model receives them."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), kwargs["timestep"].detach().clone()))

    return calls, dit.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("cfg,passes_per_image", [(1.0, 1), (0.5, 1), (0.0, 1), (1.01, 2), (4.5, 2)])
def test_dit_passes_per_step_follow_cfg(conds, cfg, passes_per_image):
    """cfg <= 1 runs no negative pass (as diffusers: guidance only when guidance_scale > 1): one DiT forward per step
    over the batch; cfg > 1 one forward over [negative, positive]."""
    pos, neg = conds
    dit = tiny.make_dit()
    calls, handle = _record_calls(dit)
    noise, gen = sampling.initial_noise(5, 2, 4, SIZE, SIZE)
    try:
        sampling.sample(dit, pos, neg, noise, steps=4, cfg=cfg, generator=gen)
    finally:
        handle.remove()
    assert [x.shape[0] for x, _ in calls] == [2 * passes_per_image] * 4


@pytest.mark.parametrize("name", [s for s in reference.SCHEDULERS if s != schedulers.DMD])
@pytest.mark.parametrize("steps,denoise", [(10, 0.6), (7, 0.3)])
def test_img2img_noises_the_input_as_diffusers_strength_does(conds, name, steps, denoise):
    """The first DiT input is the input latent noised at diffusers' img2img start timestep (StableDiffusionImg2Img
    get_timesteps + scheduler.add_noise, with the release's scheduler), and every later timestep follows."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pos, neg = conds
    dit = tiny.make_dit()
    torch.manual_seed(1)
    init = torch.randn(2, 4, SIZE // 8, SIZE // 8)
    noise, gen = sampling.initial_noise(3, 2, 4, SIZE, SIZE)
    calls, handle = _record_calls(dit)
    try:
        sampling.sample(dit, pos, neg, noise, steps=steps, cfg=4.5, scheduler=name, generator=gen,
                        init_latents=init, denoise=denoise)
    finally:
        handle.remove()
    ref = reference.scheduler(name)
    ref.set_timesteps(steps)
    timesteps, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), steps, denoise, "cpu")
    want_first = ref.scale_model_input(ref.add_noise(init, noise, timesteps[:1].repeat(2)), timesteps[0])
    assert len(calls) == len(timesteps) == n
    assert torch.allclose(torch.stack([t[0].float() for _, t in calls]), timesteps.float())
    first = calls[0][0]
    assert torch.allclose(first[:2], first[2:])  # [negative, positive] halves see the same latents
    assert (first[2:] - want_first).abs().max() <= 1e-5


def test_dmd_refuses_img2img(conds):
    pos, neg = conds
    noise, _ = sampling.initial_noise(0, 1, 4, SIZE, SIZE)
    with pytest.raises(ValueError, match="does not do img2img"):
        sampling.sample(tiny.make_dit(), pos, neg, noise, steps=1, cfg=1.0, scheduler=schedulers.DMD,
                        init_latents=torch.zeros(1, 4, 8, 8), denoise=0.5)


def _words(n_tokens: int) -> str:
    return " ".join(["Cat"] * (n_tokens - 1))


@pytest.mark.parametrize("limit,n", [(300, 299), (300, 300), (300, 301), (300, 400), (120, 120), (120, 121),
                                     (120, 300)])
def test_truncation_keeps_eos_at_the_last_position(tokenizer, limit, n):
    """A prompt over the limit keeps its first limit-1 tokens and EOS last: checked on the embeddings, against T5 run on
    the hand-built token ids."""
    t5 = tiny.make_t5()
    prompt = _words(n)
    full = tokenizer(prompt).input_ids
    assert len(full) == n and full[-1] == tokenizer.eos_token_id
    kept = full if n <= limit else full[:limit - 1] + [tokenizer.eos_token_id]
    with torch.no_grad():
        want = t5(input_ids=torch.tensor([kept])).last_hidden_state
    got, mask = ct5.encode(ct5.LoadedT5(t5, torch.float32, "none", "tiny"), tokenizer, prompt, limit, CPU,
                           cleaning="none")
    assert got.shape[1] == len(kept) == min(n, limit) and int(mask.sum()) == len(kept)
    assert (got - want).abs().max() <= 1e-5


LONG = "Visit HTTPS://EXAMPLE.COM for A <b>Red</b> Fox " + _words(200)


def test_cache_key_changes_with_every_input_that_changes_the_encoding(tokenizer):
    """For each input of an encoding (T5 identity, prompt, caption cleaning, token limit): a change that changes the
    embeddings changes the key."""
    models = {("t5-a",): tiny.make_t5(seed=0), ("t5-b",): tiny.make_t5(seed=1)}
    base = {"identity": ("t5-a",), "prompt": LONG, "cleaning": "diffusers", "max_tokens": 300}
    changes = {"identity": ("t5-b",), "prompt": LONG + " at night", "cleaning": "none", "max_tokens": 120}

    def encoding(s):
        t5 = ct5.LoadedT5(models[s["identity"]], torch.float32, "none", "tiny")
        return ct5.encode(t5, tokenizer, s["prompt"], s["max_tokens"], CPU, cleaning=s["cleaning"])[0]

    def key(s):
        return ct5.cache_key(s["identity"], ct5.preprocess(s["prompt"], s["cleaning"]), s["cleaning"], s["max_tokens"])

    for field, value in changes.items():
        changed = {**base, field: value}
        a, b = encoding(base), encoding(changed)
        assert a.shape != b.shape or not torch.equal(a, b), f"{field}: the change should change the encoding"
        assert key(base) != key(changed), f"the cache key ignores {field}"
    # max_tokens 0 (from the DiT) carries extra encodings: its key is not the 300-token one.
    assert key(base) != key({**base, "max_tokens": ct5.AUTO_TOKENS})
    # cleaning modes whose text happens to agree still differ in the key (the mode is part of what was encoded)
    assert ct5.cache_key(("t5-a",), "a cat", "diffusers", 300) != ct5.cache_key(("t5-a",), "a cat", "lowercase", 300)


def test_token_limits_from_the_dit():
    assert ct5.token_limits(ct5.AUTO_TOKENS) == [reference.MAX_TOKENS["sigma"], reference.MAX_TOKENS["alpha"]]
    assert ct5.token_limits(77) == [77]
    with pytest.raises(ValueError, match="must be 0"):
        ct5.token_limits(-1)


def test_for_limit_picks_the_encoding_made_at_the_dit_limit():
    long = conditioning.Conditioning(torch.zeros(1, 300, 4), torch.ones(1, 300, dtype=torch.long))
    short = conditioning.Conditioning(torch.ones(1, 120, 4), torch.ones(1, 120, dtype=torch.long))
    long.at_limit[120] = short
    assert conditioning.for_limit(long, 120) is short
    assert conditioning.for_limit(long, 300) is long
    plain = conditioning.Conditioning(torch.zeros(1, 150, 4), torch.ones(1, 150, dtype=torch.long))
    assert conditioning.for_limit(plain, 120) is plain  # nothing better to offer: the sampler warns
    fits = conditioning.Conditioning(torch.zeros(1, 120, 4), torch.ones(1, 120, dtype=torch.long), {120: short})
    assert conditioning.for_limit(fits, 120) is fits


# --- the Text Encode node inside ComfyUI: its cache and the token limit that follows the DiT ---------------------

def _prompt(max_tokens, cleaning, positive=LONG, **kw):
    from test_nodes import graph

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
    from nodes_cache_helpers import clear_embeddings

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
    from test_nodes import graph

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

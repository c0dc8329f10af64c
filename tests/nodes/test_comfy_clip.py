"""PixArt-Σ Text Encode fed by a ComfyUI CLIP (CLIPLoader / DualCLIPLoader / a GGUF CLIP loader) instead of our T5.

ComfyUI's T5-XXL text encoder class reads its fixed XXL config (24 layers of width 4096), so the tiny stand-ins here
are ComfyUI's own classes with a tiny config, exactly as ComfyUI composes them for PixArt
(`comfy/text_encoders/pixart_t5.py`: an `SD1ClipModel` named t5xxl around an `SDClipModel` whose module is
`comfy.text_encoders.t5.T5`), wrapped in ComfyUI's `comfy.sd.CLIP` with its ModelPatcher. The reference is
transformers' T5EncoderModel with the same weights.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness import models as tiny

PROMPT = "A small cabin on top of a snowy mountain in the style of Disney, artstation"


def comfy_clip(tmp_path, state_dict: dict, config: dict, part: str = "t5xxl", model_type: str = "t5",
               dtype: torch.dtype = torch.float32):
    """A ComfyUI CLIP holding a T5-family encoder built by ComfyUI's classes from `config` (a transformers T5
    config), named `part` inside the text encoder model as ComfyUI names it, with `state_dict` loaded by
    ComfyUI's load_sd."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.t5

    cfg = {**config, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": model_type}
    path = tmp_path / f"{part}_config.json"
    path.write_text(json.dumps(cfg))

    class TinyT5(comfy.sd1_clip.SDClipModel):  # ComfyUI's T5XXLModel.__init__, with this config file
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=str(path),
                             special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             model_options={**model_options, "model_name": part})

    class TinyTE(comfy.sd1_clip.SD1ClipModel):  # ComfyUI's PixArtT5XXL
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name=part, clip_model=TinyT5, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, TinyTE)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
    missing, unexpected = clip.load_sd(state_dict)
    assert not unexpected and not [k for k in missing if "embed_tokens" not in k], (missing, unexpected)
    return clip


@pytest.fixture(scope="module")
def t5_and_clip(comfy, tmp_path_factory):
    t5 = tiny.make_t5()
    sd = {k: v.float() for k, v in tiny.t5_single_file_sd(t5, dtype=torch.float32).items()}
    return t5, comfy_clip(tmp_path_factory.mktemp("clip"), sd, tiny.T5_CONFIG)


def _encode(comfy, t5, positive=PROMPT, negative="", max_tokens=300, cleaning="diffusers"):
    node = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaTextEncode"]
    return node.execute(t5=t5, positive=positive, negative=negative, max_tokens=max_tokens,
                        caption_cleaning=cleaning).result


def _reference(t5_model, text: str, max_tokens: int):
    """transformers' T5 on the ids transformers' tokenizer gives for the cleaned text (diffusers' rules)."""
    from diffusers import PixArtSigmaPipeline
    from transformers import AutoTokenizer

    from harness.location import use

    tok = AutoTokenizer.from_pretrained(str(use() / "comfy" / "text_encoders" / "t5_tokenizer"))
    pipe = PixArtSigmaPipeline.__new__(PixArtSigmaPipeline)  # only its text methods are used
    cleaned = pipe._text_preprocessing(text, clean_caption=True)[0]
    ids = tok([cleaned], max_length=max_tokens, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return t5_model(input_ids=ids).last_hidden_state


def test_comfy_clip_t5_equals_transformers_t5_with_the_same_weights(comfy, t5_and_clip):
    t5_model, clip = t5_and_clip
    pos, neg = _encode(comfy, clip)
    ref = _reference(t5_model, PROMPT, 300)
    assert pos.embeds.shape == ref.shape and pos.mask.shape == ref.shape[:2] and bool(pos.mask.all())
    torch.testing.assert_close(pos.embeds, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg.embeds, _reference(t5_model, "", 300), rtol=1e-5, atol=1e-5)


def test_comfy_clip_is_cut_at_the_token_limit_as_our_t5(comfy, t5_and_clip):
    """A prompt over max_tokens keeps its first max_tokens - 1 tokens and EOS (transformers' truncation)."""
    t5_model, clip = t5_and_clip
    pos, _ = _encode(comfy, clip, max_tokens=8)
    ref = _reference(t5_model, PROMPT, 8)
    assert pos.embeds.shape[1] == 8
    torch.testing.assert_close(pos.embeds, ref, rtol=1e-5, atol=1e-5)


def test_comfy_clip_matches_our_t5_loader_on_the_same_file(comfy, t5_and_clip):
    t5_model, clip = t5_and_clip
    loader = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"]
    ours = loader.execute(t5_name="tiny_t5xxl_fp16.safetensors", quantization="none", dtype="fp32").result[0]
    # The file holds fp16 weights: give the CLIP the same fp16-rounded values.
    sd = {k: v.float() for k, v in tiny.t5_single_file_sd(t5_model, dtype=torch.float16).items()}
    clip.load_sd(sd)
    try:
        for a, b in zip(_encode(comfy, ours, max_tokens=0), _encode(comfy, clip, max_tokens=0)):
            torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-5)
            assert torch.equal(a.mask, b.mask)
    finally:
        clip.load_sd({k: v.float() for k, v in tiny.t5_single_file_sd(t5_model, dtype=torch.float32).items()})


def test_the_mask_reaches_comfyuis_t5(comfy, t5_and_clip):
    """Padded to max_tokens with the mask (diffusers' form), the real tokens' embeddings are the unpadded ones:
    ComfyUI's T5 got the mask (without it the pads change every token)."""
    from harness.comfyui import pack

    _, clip = t5_and_clip
    src, core = pack("nodes.clip_t5").source(clip), pack("pixart_core.t5")
    loaded, device = src.load()
    short, _ = core.encode(loaded, src.tokenizer, PROMPT, 300, device)
    padded, mask = core.encode(loaded, src.tokenizer, PROMPT, 300, device, pad=True)
    n = short.shape[1]
    assert padded.shape[1] == 300 and int(mask.sum()) == n
    torch.testing.assert_close(padded[:, :n], short, rtol=1e-5, atol=1e-5)
    ids = src.tokenizer([core.preprocess(PROMPT)], padding="max_length", max_length=300, truncation=True,
                        return_tensors="pt").input_ids
    unmasked = loaded.model(input_ids=ids, attention_mask=None).last_hidden_state
    assert (unmasked[:, :n] - short).abs().max() > 1e-3


def test_comfy_clip_embeddings_cached_per_clip_and_patches(comfy, t5_and_clip, caplog):
    """Encoding the same prompt again with the same CLIP does not load it again; a patched clone (ComfyUI's LoRA
    route) gets its own embeddings."""
    import comfy.model_management as mm

    t5_model, clip = t5_and_clip
    first = _encode(comfy, clip, positive="cached prompt")[0]
    mm.unload_all_models()
    second = _encode(comfy, clip, positive="cached prompt")[0]
    assert second is first
    assert not any(m.model is clip.patcher for m in mm.current_loaded_models)

    patched = clip.clone()
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    w = clip.cond_stage_model.t5xxl.transformer.state_dict()[key]
    patched.add_patches({"t5xxl.transformer." + key: (torch.ones_like(w),)}, strength_patch=0.5)
    changed = _encode(comfy, patched, positive="cached prompt")[0]
    assert not torch.allclose(changed.embeds, first.embeds)
    # The patch reached the weights through ComfyUI's patcher: the same change in transformers' T5 gives the same.
    ref = tiny.make_t5()
    with torch.no_grad():
        ref.encoder.block[0].layer[0].SelfAttention.q.weight += 0.5
    torch.testing.assert_close(changed.embeds, _reference(ref, "cached prompt", 300), rtol=1e-5, atol=1e-5)
    mm.unload_all_models()
    again = _encode(comfy, clip, positive="cached prompt")[0]
    assert again is first


def test_clip_without_t5_xxl_is_named(comfy):
    """CLIP-L only (ComfyUI's SD1ClipModel with its CLIP-L config) and a umT5 (a position bias in every layer,
    as ComfyUI builds it for model_type umt5) are refused with what they are."""
    nodes = comfy
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    clip_l = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                  comfy.sd1_clip.SD1ClipModel),
                           model_options={"initial_device": torch.device("meta")})
    with pytest.raises(ValueError, match=r"holds CLIP-L, no T5-XXL.*CLIPLoader type 'sd3' or 'pixart'"):
        _encode(nodes, clip_l)

    import comfy.ops
    import comfy.text_encoders.t5

    cfg = {**tiny.T5_CONFIG, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "umt5"}
    module = comfy.text_encoders.t5.T5(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    assert module.encoder.block[1].layer[0].SelfAttention.relative_attention_bias is not None  # umT5, per ComfyUI
    holder = torch.nn.Module()
    holder.umt5xxl = torch.nn.Module()
    holder.umt5xxl.transformer = module
    clip_l.cond_stage_model = holder
    with pytest.raises(ValueError, match=r"umT5 encoder.*PixArt needs T5-v1.1-XXL"):
        _encode(nodes, clip_l)

    cfg = {**cfg, "model_type": "t5", "vocab_size": 32000}  # a T5 layout with another vocabulary
    holder.umt5xxl.transformer = comfy.text_encoders.t5.T5(cfg, torch.float32, "meta", comfy.ops.manual_cast)
    with pytest.raises(ValueError, match=r"a T5 with a 32000-token vocabulary .*32128 tokens"):
        _encode(nodes, clip_l)


HINT = ("PixArt needs T5-v1.1-XXL: load t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn.safetensors) with CLIPLoader "
        "type 'sd3' or 'pixart', or use PixArt-Σ T5 Loader.")


def _holding(clip, part: str, module):
    """`clip` with its text encoder model replaced by one holding `module` as `<part>.transformer`, as ComfyUI's
    SD1ClipModel names its encoders."""
    holder = torch.nn.Module()
    setattr(holder, part, torch.nn.Module())
    getattr(holder, part).transformer = module
    clip.cond_stage_model = holder
    return clip


def test_clip_refusals_say_what_the_input_holds_and_what_to_load(comfy):
    """The whole messages: what the t5 input is, and the T5-v1.1-XXL file and loaders to use instead (the umT5
    vocabulary, 256384 tokens, is named even where the layers do not show a umT5)."""
    nodes = comfy
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5

    with pytest.raises(TypeError) as e:
        _encode(nodes, torch.nn.Linear(1, 1))
    assert str(e.value) == ("PixArt-Σ Text Encode: the t5 input is a Linear, neither a PixArt-Σ T5 Loader output nor "
                            "a ComfyUI CLIP.")

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                comfy.sd1_clip.SD1ClipModel),
                         model_options={"initial_device": torch.device("meta")})
    with pytest.raises(ValueError) as e:
        _encode(nodes, clip)
    assert str(e.value) == f"PixArt-Σ Text Encode: this CLIP holds CLIP-L, no T5-XXL. {HINT}"

    def t5(**over):
        cfg = {**tiny.T5_CONFIG, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5", **over}
        return comfy.text_encoders.t5.T5(cfg, torch.float32, "meta", comfy.ops.manual_cast)

    with pytest.raises(ValueError) as e:  # as ComfyUI builds a umT5 (model_type umt5): a position bias in every layer
        _encode(nodes, _holding(clip, "umt5xxl", t5(model_type="umt5")))
    assert str(e.value) == ("PixArt-Σ Text Encode: this CLIP holds a umT5 encoder (umT5-XXL; a relative position bias "
                            f"in every layer), not T5-v1.1-XXL. {HINT}")
    for vocab, what in ((256384, "a umT5 encoder"), (32000, "a T5 with a 32000-token vocabulary")):
        with pytest.raises(ValueError) as e:
            _encode(nodes, _holding(clip, "t5xxl", t5(vocab_size=vocab)))
        assert str(e.value) == (f"PixArt-Σ Text Encode: this CLIP holds {what} (t5xxl); PixArt needs T5-v1.1-XXL's "
                                f"32128 tokens. {HINT}")


def test_a_clip_t5_of_another_width_is_used_with_a_warning(comfy, t5_and_clip, caplog):
    """T5-v1.1-XXL is 4096 wide (its config on the hub: d_model 4096); a narrower T5 encodes, with a warning that the
    DiT's caption projection must match its width (the tiny T5 here is narrower)."""
    _, clip = t5_and_clip
    caplog.set_level("WARNING")
    _encode(comfy, clip)
    width = tiny.T5_CONFIG["d_model"]
    assert width != 4096
    assert [r.getMessage() for r in caplog.records if "wide" in r.getMessage()] == [
        f"PixArt-Σ Text Encode: the CLIP's T5 is {width} wide, not T5-v1.1-XXL's 4096: the DiT's caption projection "
        "must match it."]


def test_what_the_clip_reader_accepts_and_how_it_names_a_clip(comfy):
    """nodes/comfy/clip.py on ComfyUI's own classes (meta device): an object with a text model but no ModelPatcher
    is no CLIP; a T5 beside other encoders, and a one-layer T5, are found; the parts are named as ComfyUI's loaders
    name them (SDXL's CLIP-L + CLIP-G), an unknown part by its attribute name, an empty model by its class."""
    nodes = comfy
    import types

    import comfy.ops
    import comfy.text_encoders.t5

    from harness.comfyui import pack

    reader, clip_t5 = pack("nodes.comfy.clip"), pack("nodes.clip_t5")
    cfg = {**tiny.T5_CONFIG, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}
    one_layer = comfy.text_encoders.t5.T5({**cfg, "num_layers": 1}, torch.float32, "meta", comfy.ops.manual_cast)
    holder = torch.nn.Module()
    holder.clip_l, holder.t5xxl = torch.nn.Linear(1, 1), torch.nn.Module()
    holder.t5xxl.transformer = one_layer
    assert reader.text_model(types.SimpleNamespace(cond_stage_model=holder)) is None  # no patcher: not a CLIP
    with pytest.raises(TypeError, match="the t5 input is a SimpleNamespace, neither"):
        _encode(nodes, types.SimpleNamespace(cond_stage_model=holder))
    clip = types.SimpleNamespace(cond_stage_model=holder, patcher=object())
    assert clip_t5.find_t5(clip) is one_layer
    assert reader.describe(holder) == "CLIP-L + t5xxl"
    named = torch.nn.Module()
    named.clip_l, named.clip_g, named.mystery = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert reader.describe(named) == "CLIP-L + CLIP-G + mystery"
    assert reader.describe(torch.nn.Module()) == "Module"


def test_a_bf16_clip_computes_in_float32_as_comfyuis_text_encode(comfy, tmp_path):
    """A CLIP whose T5 weights are bf16 (CLIPLoader on a bf16 file): the encoder runs in float32 with the weights
    cast up, as ComfyUI's SDClipModel runs it, so it equals transformers' float32 T5 with the same (bf16-rounded)
    weights; computed in bf16 it would differ by ~1e-2."""
    t5 = tiny.make_t5()
    sd = {k: v.to(torch.bfloat16) for k, v in tiny.t5_single_file_sd(t5, dtype=torch.float32).items()}
    clip = comfy_clip(tmp_path, sd, tiny.T5_CONFIG, dtype=torch.bfloat16)
    rounded = tiny.make_t5()
    rounded.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    rounded.encoder.embed_tokens.weight = rounded.shared.weight
    got = _encode(comfy, clip, max_tokens=300)[0].embeds
    want = _reference(rounded, PROMPT, 300)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, :want.shape[1]], want, atol=1e-5, rtol=1e-5)

"""PixArt-Σ LoRA Loader (issue 15): every file format against a hand-merged model, stacking, strength 0, unloading,
T5 parts, quantized T5, other models' LoRAs, and the graph in ComfyUI's executor with the DiT offloaded between
prompts.

Expected values come from outside the pack: the merge formula by hand (LoRA W + s·(alpha/rank)·B·A, LoHa
W + s·(alpha/rank)·(w1a·w1b)⊙(w2a·w2b), LoKr W + s·(alpha/rank)·kron(w1, w2a·w2b), as LyCORIS defines them), the
original → diffusers layout of DESIGN.md §3 (fused qkv rows in q, k, v order), PEFT's own forward of its LoRA'd
model, and diffusers' / transformers' forwards of the hand-merged weights.
"""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from pixart_core import lora as core_lora
from pixart_core import t5 as ct5
from conftest import COMFY
from test_nodes import DIT_FILE, _saved_images, graph

T5_FILE = "tiny_t5xxl_fp16.safetensors"
STRENGTH = 0.7
torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- building LoRA files

def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _lora_pair(rows, cols, rank, seed):
    return _rand(rank, cols, seed=seed), _rand(rows, rank, seed=seed + 1)  # down (A), up (B)


def _rows(full, parts, shapes):
    """A fused layer's change cut into its parts' rows, in order (q, k, v); a plain layer's change as it is."""
    out, start = {}, 0
    for p in parts:
        n = shapes[p + ".weight"][0]
        out[p + ".weight"] = full[start:start + n]
        start += n
    assert start == full.shape[0]
    return out


def kohya_diffusers(dit):
    """lora_unet_<diffusers module path>: lora_down / lora_up / alpha (alpha 2, rank 4)."""
    mods = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_k", "transformer_blocks.0.ff.net.2",
            "caption_projection.linear_1", "adaln_single.linear", "proj_out", "pos_embed.proj"]
    sd = tiny.kohya_lora(_shapes(dit), mods, rank=4, alpha=2.0, seed=1, scale=0.1)
    deltas = {}
    for m in mods:
        k = "lora_unet_" + m.replace(".", "_")
        deltas[m + ".weight"] = 2.0 / 4 * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]
    return sd, {}, deltas


ORIGINAL_PLAIN = {"blocks.0.attn.proj": "transformer_blocks.0.attn1.to_out.0",
                  "blocks.1.cross_attn.q_linear": "transformer_blocks.1.attn2.to_q",
                  "blocks.0.mlp.fc1": "transformer_blocks.0.ff.net.0.proj",
                  "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
                  "y_embedder.y_proj.fc2": "caption_projection.linear_2",
                  "final_layer.linear": "proj_out", "t_block.1": "adaln_single.linear"}


def _original(dit, naming):
    """Original PixArt module names (DESIGN.md §3), fused qkv and kv included; rank 4, alpha 1."""
    shapes = _shapes(dit)
    sd, deltas, seed = {}, {}, 10
    fused = {"blocks.0.attn.qkv": [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"],
             "blocks.1.cross_attn.kv_linear": [f"transformer_blocks.1.attn2.to_{c}" for c in "kv"]}
    for orig, ours in [*ORIGINAL_PLAIN.items(), *fused.items()]:
        parts = ours if isinstance(ours, list) else [ours]
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        down, up = _lora_pair(rows, shapes[parts[0] + ".weight"][1], 4, seed)
        seed += 2
        name = naming(orig)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})
        full = 1.0 / 4 * up @ down  # a fused layer's change: its rows are q, k, v (kv: k, v)
        deltas.update(_rows(full, parts, shapes))
    return sd, {}, deltas


def kohya_original(dit):
    return _original(dit, lambda o: "lora_transformer_" + o.replace(".", "_"))


def dotted_original(dit):
    return _original(dit, lambda o: "diffusion_model." + o)


def loha(dit):
    """LyCORIS LoHa on a plain and a fused layer: (w1a·w1b)⊙(w2a·w2b)·alpha/rank (alpha 3, rank 4)."""
    shapes = _shapes(dit)
    sd, deltas = {}, {}
    for i, (name, parts) in enumerate([("lora_unet_transformer_blocks_1_ff_net_2", ["transformer_blocks.1.ff.net.2"]),
                                       ("lycoris_blocks_1_attn_qkv", [f"transformer_blocks.1.attn1.to_{c}" for c in "qkv"])]):
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        cols = shapes[parts[0] + ".weight"][1]
        t = {"hada_w1_a": _rand(rows, 4, seed=20 + i) * 4, "hada_w1_b": _rand(4, cols, seed=30 + i) * 4,
             "hada_w2_a": _rand(rows, 4, seed=40 + i) * 4, "hada_w2_b": _rand(4, cols, seed=50 + i) * 4}
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        sd[f"{name}.alpha"] = torch.tensor(3.0)
        full = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 3.0 / 4
        deltas.update(_rows(full, parts, shapes))
    return sd, {}, deltas


def lokr(dit):
    """LyCORIS LoKr: kron(w1, w2a·w2b)·alpha/rank (w2 factored, rank 2, alpha 1), on ff.net.0.proj and a fused kv."""
    shapes = _shapes(dit)
    sd, deltas = {}, {}
    for i, (name, parts) in enumerate([("lora_unet_transformer_blocks_0_ff_net_0_proj", ["transformer_blocks.0.ff.net.0.proj"]),
                                       ("lora_unet_blocks_0_cross_attn_kv_linear", [f"transformer_blocks.0.attn2.to_{c}" for c in "kv"])]):
        rows = sum(shapes[p + ".weight"][0] for p in parts)
        cols = shapes[parts[0] + ".weight"][1]
        a, b = 4, 4  # w1 [4, 4]; w2 [rows/4, cols/4] = w2a [rows/4, 2] @ w2b [2, cols/4]
        t = {"lokr_w1": _rand(a, b, seed=60 + i) * 4, "lokr_w2_a": _rand(rows // a, 2, seed=70 + i) * 4,
             "lokr_w2_b": _rand(2, cols // b, seed=80 + i) * 4}
        sd.update({f"{name}.{k}": v for k, v in t.items()})
        sd[f"{name}.alpha"] = torch.tensor(1.0)
        full = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 1.0 / 2
        deltas.update(_rows(full, parts, shapes))
    return sd, {}, deltas


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "linear_1", "proj"]


def _peft(dit, alpha, rank=4, alpha_pattern=None, rslora=False):
    """A real PEFT LoRA on the tiny DiT (random A and B), its state dict as PEFT names it, its config, its model."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=False,
                        alpha_pattern=alpha_pattern or {}, use_rslora=rslora)
    torch.manual_seed(5)
    model = get_peft_model(copy.deepcopy(dit), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    sd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return sd, config, model


def _peft_deltas(sd, config, prefix):
    import re

    deltas = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            m = k[len(prefix):-len(".lora_A.weight")]
            A, B = sd[k], sd[k.replace("lora_A", "lora_B")]
            alpha = next((v for pat, v in config.alpha_pattern.items() if re.fullmatch(rf"(.*\.)?({pat})", m)),
                         config.lora_alpha)
            scale = alpha / (config.r ** 0.5 if config.use_rslora else config.r)
            deltas[m + ".weight"] = scale * (B.flatten(1) @ A.flatten(1))
    return deltas


def peft_folder(dit):
    """PEFT's save_pretrained: adapter_model.safetensors (base_model.model. keys) + adapter_config.json (alpha 8,
    rank 4: scale 2, which only the json carries)."""
    sd, config, model = _peft(dit, alpha=8)
    return sd, {"adapter_config.json": json.dumps(config.to_dict(), default=list)}, _peft_deltas(sd, config, "base_model.model."), model


def diffusers_file(dit):
    """diffusers' writer (LoraBaseMixin.write_lora_layers): transformer.-prefixed keys, the config in the
    lora_adapter_metadata header (alpha 2, rank 4, alpha_pattern to_k: 12, rsLoRA)."""
    sd, config, model = _peft(dit, alpha=2, alpha_pattern={"to_k": 12}, rslora=True)
    sd = {"transformer." + k[len("base_model.model."):]: v for k, v in sd.items()}
    meta = {f"transformer.{k}": v for k, v in config.to_dict().items()}
    return sd, {"metadata": meta}, _peft_deltas(sd, config, "transformer."), model


def peft_bare(dit):
    """PEFT keys without any prefix and no alpha anywhere: alpha = rank (scale 1), as diffusers assumes."""
    sd, config, model = _peft(dit, alpha=4)
    sd = {k[len("base_model.model."):]: v for k, v in sd.items()}
    return sd, {}, _peft_deltas(sd, config, ""), model


FORMATS = {"kohya_diffusers": kohya_diffusers, "kohya_original_fused": kohya_original,
           "original_dotted_fused": dotted_original, "loha": loha, "lokr": lokr,
           "peft_folder": peft_folder, "diffusers_metadata": diffusers_file, "peft_no_prefix": peft_bare}


def merge(base: dict[str, torch.Tensor], *changes: tuple[float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Hand merge: W + strength * delta (a conv's delta reshaped to its kernel) for each (strength, deltas)."""
    out = {}
    for k, v in base.items():
        w = v.clone()
        for strength, deltas in changes:
            if k in deltas:
                w = w + strength * deltas[k].reshape(v.shape)
        out[k] = w.contiguous()
    return out


def write_lora(comfy_base, name, sd, extra=None):
    """Into models/loras: a .safetensors (name), or a PEFT folder (name/adapter_model.safetensors + json)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    extra = extra or {}
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    if "adapter_config.json" in extra:
        (loras / name).mkdir(exist_ok=True)
        save_file(sd, str(loras / name / "adapter_model.safetensors"))
        (loras / name / "adapter_config.json").write_text(extra["adapter_config.json"])
        return f"{name}/adapter_model.safetensors"
    if "metadata" in extra:
        LoraBaseMixin.write_lora_layers(sd, str(loras / name), True, "lora.safetensors", None, True,
                                        lora_adapter_metadata=dict(extra["metadata"]))
        return f"{name}/lora.safetensors"
    save_file(sd, str(loras / f"{name}.safetensors"))
    return f"{name}.safetensors"


# ------------------------------------------------------------------------------------------------ the nodes

def _node(comfy, node_id):
    return comfy.NODE_CLASS_MAPPINGS[node_id]


def load_dit(comfy):
    return _node(comfy, "PixArtSigmaDiTLoader").execute(dit_name=DIT_FILE, variant="auto", dtype="fp32").result[0]


def apply(comfy, dit, name, strength=STRENGTH, t5=None, t5_strength=1.0):
    return _node(comfy, "PixArtSigmaLoraLoader").execute(dit=dit, lora_name=name, strength=strength, t5=t5,
                                                           t5_strength=t5_strength).result


def loaded_weights(handle) -> dict[str, torch.Tensor]:
    """The weights ComfyUI runs the model with: load the patcher (merging its patches), copy its state dict."""
    import comfy.model_management as mm

    mm.load_models_gpu([handle.patcher])
    return {k: v.detach().clone() for k, v in handle.patcher.model.inner.state_dict().items()}


def dit_out(weights, config=None):
    """diffusers' PixArtTransformer2DModel forward with these weights on fixed inputs."""
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(**(config or tiny.dit_config())).eval()
    model.load_state_dict(weights)
    return forward(model)


def forward(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 5, tiny.T5_WIDTH, generator=g)
    with torch.no_grad():
        return model(x, encoder_hidden_states=cond, timestep=torch.tensor([500]),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


@pytest.fixture(autouse=True)
def _unload(request):
    """Tests inside ComfyUI start and end with nothing loaded; the key-conversion tests need no ComfyUI."""
    if not {"comfy", "executor"} & set(request.fixturenames):
        yield
        return
    import comfy.model_management as mm

    mm.unload_all_models()
    yield
    mm.unload_all_models()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_lora_format_equals_hand_merged_model(comfy, comfy_base, tiny_models, fmt):
    import comfy.model_management as mm

    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    made = FORMATS[fmt](tiny_models["dit"])
    sd, extra, deltas = made[:3]
    name = write_lora(comfy_base, f"lora_{fmt}", sd, extra)
    dit = load_dit(comfy)
    out_dit, out_t5 = apply(comfy, dit, name)
    assert out_t5 is None and out_dit is not dit and out_dit.patcher is not dit.patcher
    expected = merge(base_w, (STRENGTH, deltas))
    got = loaded_weights(out_dit)
    for k in base_w:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=0, msg=f"{fmt}: {k}")
    assert len(deltas) >= 3
    assert (dit_out(got) - dit_out(expected)).abs().max() <= 1e-5
    assert (dit_out(got) - dit_out(base_w)).abs().max() > 1e-3  # the LoRA changes the output
    if len(made) > 3:  # PEFT's own LoRA'd model at the same strength: PEFT's forward is the reference
        peft_model = made[3]
        for module in peft_model.modules():
            if hasattr(module, "scaling"):
                module.scaling = {a: s * STRENGTH for a, s in module.scaling.items()}
        g = torch.Generator().manual_seed(3)
        x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, tiny.T5_WIDTH, generator=g)
        with torch.no_grad():
            ref = peft_model(x, encoder_hidden_states=cond, timestep=torch.tensor([500]),
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert (dit_out(got) - ref).abs().max() <= 1e-5
    # unloading (ComfyUI's unpatch) restores the original weights bit-exact; the base handle never changed
    mm.unload_all_models()
    for k, v in out_dit.patcher.model.inner.state_dict().items():
        assert torch.equal(v, base_w[k]), k
    assert not dit.patcher.patches
    for k, v in loaded_weights(dit).items():
        assert torch.equal(v, base_w[k]), k


def test_partially_loaded_lora_dit_streams_patched_weights(comfy, comfy_base, tiny_models):
    """ComfyUI's partial (lowvram) load of a LoRA'd DiT: the layers that do not fit keep their original weights and
    get the LoRA applied on the fly at each forward (ComfyUI's LowVramPatch on our cast-weights layers); the output
    is the hand-merged model's, and unpatching leaves the weights as they were."""
    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    sd, _, deltas = kohya_original(tiny_models["dit"])
    out, _ = apply(comfy, load_dit(comfy), write_lora(comfy_base, "lora_partial", sd))
    patcher = out.patcher
    cpu = torch.device("cpu")
    patcher.patch_model(device_to=cpu, lowvram_model_memory=patcher.model_size() // 2)
    try:
        streamed = [m for m in patcher.model.modules() if getattr(m, "weight_function", None)]
        assert streamed, "no LoRA'd layer was left to stream: not a partial load"
        inner = patcher.model.inner
        kept = [k for k in deltas if torch.equal(inner.state_dict()[k], base_w[k])]
        assert kept, "every LoRA'd weight was merged in place: nothing was patched on the fly"
        got = forward(inner)
    finally:
        patcher.unpatch_model(cpu)
    assert (got - dit_out(merge(base_w, (STRENGTH, deltas)))).abs().max() <= 1e-5
    for k, v in patcher.model.inner.state_dict().items():
        assert torch.equal(v, base_w[k]), k


def test_strength_zero_is_the_base_model(comfy, comfy_base, tiny_models):
    sd, _, _ = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_zero", sd)
    dit = load_dit(comfy)
    out, _ = apply(comfy, dit, name, strength=0.0)
    for k, v in loaded_weights(out).items():
        assert torch.equal(v, tiny_models["dit"].state_dict()[k]), k


def test_two_stacked_loras_add_up(comfy, comfy_base, tiny_models):
    base_w = tiny_models["dit"].state_dict()
    sd1, _, d1 = kohya_diffusers(tiny_models["dit"])
    sd2, extra2, d2, _ = peft_folder(tiny_models["dit"])
    n1, n2 = write_lora(comfy_base, "stack_a", sd1), write_lora(comfy_base, "stack_b", sd2, extra2)
    dit = load_dit(comfy)
    first, _ = apply(comfy, dit, n1, strength=0.6)
    both, _ = apply(comfy, first, n2, strength=-0.4)
    got = loaded_weights(both)
    assert set(d1) & set(d2)  # both change some of the same weights
    want = merge(base_w, (0.6, d1), (-0.4, d2))
    for k in base_w:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
    assert len(first.patcher.patches) < len(both.patcher.patches) and not dit.patcher.patches


def _t5_lora(t5):
    """kohya lora_te_ keys on self-attention q and the gated-GELU wi_0, and PEFT text_encoder. keys on wo."""
    shapes = _shapes(t5)
    sd, deltas = {}, {}
    kohya_mods = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0"]
    sd.update(tiny.kohya_lora(shapes, kohya_mods, rank=4, alpha=2.0, seed=90, prefix="lora_te_", scale=0.3))
    for m in kohya_mods:
        k = "lora_te_" + m.replace(".", "_")
        deltas[m + ".weight"] = 0.5 * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]
    m = "encoder.block.0.layer.1.DenseReluDense.wo"
    down, up = _lora_pair(shapes[m + ".weight"][0], shapes[m + ".weight"][1], 4, 95)
    sd[f"text_encoder.{m}.lora_A.weight"], sd[f"text_encoder.{m}.lora_B.weight"] = down * 3, up * 3
    deltas[m + ".weight"] = 9 * up @ down  # no alpha: alpha = rank
    return sd, deltas


def _encode(comfy, t5, text="a red fox in the snow"):
    return _node(comfy, "PixArtSigmaTextEncode").execute(t5=t5, positive=text, negative="", max_tokens=300).result[0]


def test_t5_part_equals_hand_merged_t5_and_gets_its_own_embeddings(comfy, comfy_base, tiny_models, caplog):
    t5_model = tiny_models["t5"]
    t5_sd, t5_deltas = _t5_lora(t5_model)
    sd, _, dit_deltas = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_with_t5", {**sd, **t5_sd})
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    base_cond = _encode(comfy, t5)
    with caplog.at_level(logging.INFO):
        dit, new_t5 = apply(comfy, load_dit(comfy), name, t5=t5, t5_strength=0.5)
    assert "DiT: 7 weights patched (strength 0.7); T5: 3 weights patched (strength 0.5)" in caplog.text
    assert new_t5.identity != t5.identity and not t5.patcher.patches
    got = loaded_weights(new_t5)
    fp16_base = {k: v.half().float() for k, v in t5_model.state_dict().items()}  # the file is fp16
    for k, v in fp16_base.items():
        want = v + 0.5 * t5_deltas[k] if k in t5_deltas else v
        torch.testing.assert_close(got[k], want, atol=1e-5, rtol=0, msg=k)
    # the LoRA'd T5's embeddings: transformers' T5 with the hand-merged weights, not the base T5's cached ones
    cond = _encode(comfy, new_t5)
    merged = tiny.make_t5()
    merged.load_state_dict({k: v + 0.5 * t5_deltas[k] if k in t5_deltas else v for k, v in fp16_base.items()})
    tok = ct5.load_tokenizer([COMFY / "comfy" / "text_encoders" / "t5_tokenizer"])
    ids = tok([ct5.preprocess("a red fox in the snow")], return_tensors="pt")
    with torch.no_grad():
        ref = merged(**ids).last_hidden_state
    assert (cond.embeds - ref).abs().max() <= 1e-5
    assert (cond.embeds - base_cond.embeds).abs().max() > 1e-3
    assert torch.equal(_encode(comfy, t5).embeds, base_cond.embeds)  # the base T5 is unchanged
    assert set(dit_deltas) <= {k[len("inner."):] for k in dit.patcher.patches}


def test_quantized_t5_warns_and_the_dit_part_still_applies(comfy, comfy_base, tiny_models, caplog):
    t5_sd, _ = _t5_lora(tiny_models["t5"])
    sd, _, deltas = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_quant_t5", {**sd, **t5_sd})
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="8-bit (bitsandbytes)",
                                                     dtype="auto").result[0]
    with caplog.at_level(logging.WARNING):
        dit, same_t5 = apply(comfy, load_dit(comfy), name, t5=t5)
    assert same_t5 is t5 and not t5.patcher.patches
    text = caplog.text
    assert "T5" in text and "NOT applied" in text and "quantized" in text and "quantization 'none'" in text
    got = loaded_weights(dit)
    base = tiny_models["dit"].state_dict()
    want = merge(base, (STRENGTH, deltas))
    for k in deltas:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_t5_keys_without_a_t5_are_reported(comfy, comfy_base, tiny_models, caplog):
    t5_sd, _ = _t5_lora(tiny_models["t5"])
    sd, _, _ = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_t5_unconnected", {**sd, **t5_sd})
    with caplog.at_level(logging.WARNING):
        apply(comfy, load_dit(comfy), name)
    assert "8 T5 (text encoder) keys were NOT applied: no T5 is connected" in caplog.text


def test_unplaceable_keys_are_listed(comfy, comfy_base, tiny_models, caplog):
    sd, _, _ = kohya_diffusers(tiny_models["dit"])
    extra = {"lora_unet_transformer_blocks_7_attn1_to_q.lora_down.weight": torch.zeros(4, 144),  # no block 7
             "lora_unet_transformer_blocks_7_attn1_to_q.lora_up.weight": torch.zeros(144, 4),
             "some_counter": torch.tensor(3)}
    name = write_lora(comfy_base, "lora_extra_keys", {**sd, **extra})
    with caplog.at_level(logging.INFO):
        dit, _ = apply(comfy, load_dit(comfy), name)
    assert "DiT: 7 weights patched (strength 0.7); T5: no T5 keys in this LoRA" in caplog.text
    for k in extra:
        assert k in caplog.text
    assert "3 keys NOT applied" in caplog.text
    assert len(dit.patcher.patches) == 7


# Other models' LoRA keys, as their trainers write them.
FOREIGN = {
    "sdxl": (["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
             "Stable Diffusion XL"),
    "sd15": (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj"], "Stable Diffusion 1.x/2.x"),
    "flux_kohya": (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"], "Flux"),
    "flux_diffusers": (["transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj"],
                       "Flux"),
    "sd3": (["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv"],
            "Stable Diffusion 3"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_other_models_loras_are_refused_by_name(kind, tiny_models):
    mods, what = FOREIGN[kind]
    sd = {}
    for m in mods:
        sd[f"{m}.lora_down.weight"], sd[f"{m}.lora_up.weight"] = torch.zeros(4, 8), torch.zeros(8, 4)
    with pytest.raises(core_lora.LoraError, match=what) as e:
        core_lora.prepare(sd, _shapes(tiny_models["dit"]), _shapes(tiny_models["t5"]), name="x.safetensors")
    assert "not a PixArt LoRA" in str(e.value) and "x.safetensors" in str(e.value)


def test_other_model_lora_fails_the_node_clearly(executor, comfy_base):
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}
    name = write_lora(comfy_base, "sdxl_style", sd)
    result = executor.run(with_loras(graph(prefix="foreign"), [(name, 1.0)]))
    assert not result["ok"]
    message = result["error"]["exception_message"]
    assert "sdxl_style.safetensors: this is a Stable Diffusion XL LoRA" in message and "not a PixArt LoRA" in message


def test_lora_for_another_size_is_refused(tiny_models):
    sd = tiny.kohya_lora({"transformer_blocks.0.attn1.to_q.weight": (1152, 1152)}, ["transformer_blocks.0.attn1.to_q"])
    with pytest.raises(core_lora.LoraError, match=r"\[1152, 1152\] change.*another size"):
        core_lora.prepare(sd, _shapes(tiny_models["dit"]))


def test_lokr_on_a_fused_layer_that_cannot_be_split_is_listed(tiny_models):
    # kron(w1 [2, 4], w2 [216, 36]): 432 rows in 2 blocks of 216, which no split into 3 x 144 rows follows
    sd = {"lora_unet_blocks_0_attn_qkv.lokr_w1": torch.zeros(2, 4), "lora_unet_blocks_0_attn_qkv.lokr_w2": torch.zeros(216, 36)}
    sd["lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(2, 144)
    sd["lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.zeros(144, 2)
    plan = core_lora.prepare(sd, _shapes(tiny_models["dit"]))
    assert plan.dit_map == {"transformer_blocks.0.attn1.to_q": "transformer_blocks.0.attn1.to_q.weight"}
    assert [u.split(":")[0] for u in plan.unplaced] == sorted(k for k in sd if "qkv" in k)
    assert all("cannot be split into 3 equal parts" in u for u in plan.unplaced)


# ------------------------------------------------------------------------------------- in ComfyUI's executor

def with_loras(prompt: dict, loras: list[tuple[str, float]]) -> dict:
    """The graph with LoRA loaders chained between the DiT loader (node 3) and the sampler (node 4)."""
    source = ["3", 0]
    for i, (name, strength) in enumerate(loras):
        nid = str(20 + i)
        prompt[nid] = {"class_type": "PixArtSigmaLoraLoader",
                       "inputs": {"dit": source, "lora_name": name, "strength": strength}}
        source = [nid, 0]
    prompt["4"]["inputs"]["dit"] = source
    return prompt


def test_graph_with_stacked_loras_survives_offload_and_equals_merged_file(executor, comfy, comfy_base, tiny_models):
    import comfy.model_management as mm

    sd1, _, d1 = kohya_diffusers(tiny_models["dit"])
    sd2, _, d2 = kohya_original(tiny_models["dit"])
    n1, n2 = write_lora(comfy_base, "graph_a", sd1), write_lora(comfy_base, "graph_b", sd2)
    base = tiny_models["dit"].state_dict()
    merged = merge(base, (0.8, d1), (0.5, d2))
    merged_name = "tiny-merged-PixArt-Sigma-XL-2-1024-MS.safetensors"
    save_file(merged, str(comfy_base / "models" / "checkpoints" / merged_name))

    def image(prompt):
        result = executor.run(prompt)
        assert result["ok"], result["error"]
        return _saved_images(result, comfy_base)[0].astype(int)

    loras = [(n1, 0.8), (n2, 0.5)]
    with_lora = image(with_loras(graph(prefix="lora_a", seed=11), loras))
    mm.unload_all_models()  # the DiT (and its patches) leave memory; the LoRA'd handle stays in ComfyUI's cache
    hand = image(graph(prefix="lora_merged", seed=11, dit=merged_name))
    plain = image(graph(prefix="lora_plain", seed=11))
    mm.unload_all_models()
    again = image(with_loras(graph(prefix="lora_b", seed=12), loras))  # reloaded: patched again
    hand_again = image(graph(prefix="lora_merged_b", seed=12, dit=merged_name))
    assert np.abs(with_lora - hand).max() <= 1 and np.abs(again - hand_again).max() <= 1
    assert np.abs(with_lora - plain).mean() > 2  # the LoRA changes the image


def test_t5_output_without_t5_input_fails_text_encode_clearly(executor, comfy_base, tiny_models):
    name = write_lora(comfy_base, "lora_no_t5_in", kohya_diffusers(tiny_models["dit"])[0])
    prompt = with_loras(graph(prefix="no_t5"), [(name, 1.0)])
    prompt["2"]["inputs"]["t5"] = ["20", 1]  # the LoRA loader's t5 output, its t5 input left open
    result = executor.run(prompt)
    assert not result["ok"]
    assert "the t5 output of PixArt-Σ LoRA Loader carries a T5 only when its t5 input is connected" in \
        result["error"]["exception_message"]


# ------------------------------------------------------------------ the key conversion alone (no ComfyUI needed)

@pytest.fixture(scope="module")
def dit_model():
    return tiny.make_dit()


def test_fused_qkv_and_kv_are_split_into_their_rows(dit_model):
    sd, _, _ = kohya_original(dit_model)
    plan = core_lora.prepare(sd, _shapes(dit_model), name="orig.safetensors")
    C = _shapes(dit_model)["transformer_blocks.0.attn1.to_q.weight"][0]
    for fused, parts in (("lora_transformer_blocks_0_attn_qkv", [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"]),
                         ("lora_transformer_blocks_1_cross_attn_kv_linear", [f"transformer_blocks.1.attn2.to_{c}" for c in "kv"])):
        for i, p in enumerate(parts):
            assert plan.dit_map[p] == p + ".weight"
            assert torch.equal(plan.dit[p + ".lora_up.weight"], sd[fused + ".lora_up.weight"][i * C:(i + 1) * C])
            assert torch.equal(plan.dit[p + ".lora_down.weight"], sd[fused + ".lora_down.weight"])
            assert plan.dit[p + ".alpha"].item() == 1.0
    for orig, ours in ORIGINAL_PLAIN.items():
        k = "lora_transformer_" + orig.replace(".", "_")
        assert torch.equal(plan.dit[ours + ".lora_up.weight"], sd[k + ".lora_up.weight"])
    assert len(plan.dit_map) == len(ORIGINAL_PLAIN) + 5 and len(plan.dit) == 3 * len(plan.dit_map)
    assert plan.unplaced == [] and plan.t5 == {} and plan.t5_keys == []
    assert plan.formats == ["LoRA, original-layout names"]


def test_peft_scaling_becomes_comfyui_alpha(dit_model):
    """PEFT's own scaling of each LoRA layer (lora_alpha / r, alpha_pattern, rsLoRA: / sqrt(r)) equals the
    alpha / rank that ComfyUI will apply, from diffusers' metadata header and from adapter_config.json."""
    for builder, meta_of in ((diffusers_file, lambda extra: {"lora_adapter_metadata": json.dumps(extra["metadata"], default=list)}),
                             (peft_folder, lambda extra: {"lora_adapter_metadata": json.loads(extra["adapter_config.json"])})):
        sd, extra, _, model = builder(dit_model)
        plan = core_lora.prepare(sd, _shapes(dit_model), metadata=meta_of(extra))
        scalings = {n[len("base_model.model."):]: m.scaling["default"] for n, m in model.named_modules()
                    if hasattr(m, "scaling") and "default" in m.scaling}
        assert len(scalings) == len(plan.dit_map) > 10
        for module, scaling in scalings.items():
            rank = plan.dit[module + ".lora_A.weight"].shape[0]
            assert plan.dit[module + ".alpha"].item() / rank == pytest.approx(scaling, rel=1e-6), module
        assert {plan.dit[m + ".alpha"].item() / 4 for m in scalings} == set(scalings.values())
    sd, _, _, _ = peft_bare(dit_model)
    plan = core_lora.prepare(sd, _shapes(dit_model))
    assert not [k for k in plan.dit if k.endswith(".alpha")]  # no alpha anywhere: ComfyUI's scale 1 (alpha = rank)
    assert plan.formats == ["LoRA (PEFT/diffusers), diffusers names"]


def test_t5_names_and_text_encoder_keys_without_a_t5(dit_model):
    t5 = tiny.make_t5()
    sd, _ = _t5_lora(t5)
    plan = core_lora.prepare(sd, _shapes(dit_model), _shapes(t5))
    assert plan.t5_map == {m: m + ".weight" for m in ("encoder.block.0.layer.0.SelfAttention.q",
                                                     "encoder.block.1.layer.1.DenseReluDense.wi_0",
                                                     "encoder.block.0.layer.1.DenseReluDense.wo")}
    assert sorted(plan.t5_keys) == sorted(sd) and plan.unplaced == [] and plan.dit_map == {}
    with pytest.raises(core_lora.LoraError, match="only text-encoder"):
        core_lora.prepare(sd, _shapes(dit_model))  # no T5 to put them on
    kohya, _, _ = kohya_diffusers(dit_model)
    plan = core_lora.prepare({**kohya, **sd}, _shapes(dit_model))
    assert len(plan.dit_map) == 7 and plan.t5_map == {} and sorted(plan.t5_keys) == sorted(sd) and not plan.unplaced
    assert "lora_te_x.lora_down.weight: names no module of the T5 encoder" in core_lora.prepare(
        {**kohya, "lora_te_x.lora_down.weight": torch.zeros(1)}, _shapes(dit_model), _shapes(t5)).unplaced


def test_nothing_placeable_names_what_the_file_looks_like(dit_model):
    sd = {"encoder.down.0.block.0.conv1.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(core_lora.LoraError, match="no key of this file names a module of the PixArt DiT or T5 "
                                                  r"\(it looks like a VAE"):
        core_lora.prepare(sd, _shapes(dit_model), name="vae.safetensors")


# The up/down tensor names ComfyUI's LoRA adapter reads (comfy/weight_adapter/lora.py, LoRAAdapter.load), as
# trainers write them: kohya, diffusers (old and new), PEFT, Mochi, transformers, Qwen's PEFT default adapter.
LORA_NAMINGS = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                (".lora_B.default.weight", ".lora_A.default.weight")]


@pytest.mark.parametrize("up,down", LORA_NAMINGS)
def test_every_up_down_naming_splits_on_fused_layers(dit_model, up, down):
    shapes = _shapes(dit_model)
    U, D = _rand(3 * 144, 2, seed=1), _rand(2, 144, seed=2)
    P, Q = _rand(144, 2, seed=3), _rand(2, 144, seed=4)
    sd = {f"diffusion_model.blocks.1.attn.qkv{up}": U, f"diffusion_model.blocks.1.attn.qkv{down}": D,
          f"transformer.transformer_blocks.0.attn1.to_out.0{up}": P,
          f"transformer.transformer_blocks.0.attn1.to_out.0{down}": Q}
    plan = core_lora.prepare(sd, shapes)
    for i, c in enumerate("qkv"):
        m = f"transformer_blocks.1.attn1.to_{c}"
        assert torch.equal(plan.dit[m + up], U[144 * i:144 * (i + 1)]) and torch.equal(plan.dit[m + down], D)
    assert torch.equal(plan.dit["transformer_blocks.0.attn1.to_out.0" + up], P)
    assert len(plan.dit) == 8 and not plan.unplaced
    with pytest.raises(core_lora.LoraError, match="another size"):
        core_lora.prepare({f"blocks.1.attn.qkv{up}": U[:, :1], f"blocks.1.attn.qkv{down}": D[:1, :100]}, shapes)


def test_lokr_and_loha_split_on_fused_layers_as_their_products_do():
    """Rows of kron(w1, w2) / (w1a·w1b)⊙(w2a·w2b) cut into q, k, v equal what the split factors make."""
    rows = (144, 144, 144)
    full = lambda t: torch.kron(t[".lokr_w1"], t[".lokr_w2"])  # noqa: E731
    for w1, w2 in ((_rand(6, 4, seed=1), _rand(72, 36, seed=2)), (_rand(1, 4, seed=3), _rand(432, 36, seed=4))):
        t = {".lokr_w1": w1, ".lokr_w2": w2, ".alpha": torch.tensor(2.0)}
        parts = core_lora.split_fused(t, rows)
        assert len(parts) == 3
        for i, part in enumerate(parts):
            assert torch.equal(full(part), full(t)[144 * i:144 * (i + 1)]) and part[".alpha"] is t[".alpha"]
    reason = core_lora.split_fused({".lokr_w1": _rand(2, 4, seed=5), ".lokr_w2": _rand(216, 36, seed=6)}, rows)
    assert reason == "its LoKr factors (2 x 216 rows) cannot be split into 3 equal parts exactly"
    h = {".hada_w1_a": _rand(288, 2, seed=7), ".hada_w1_b": _rand(2, 144, seed=8), ".hada_w2_a": _rand(288, 2, seed=9),
         ".hada_w2_b": _rand(2, 144, seed=10)}
    prod = lambda t: (t[".hada_w1_a"] @ t[".hada_w1_b"]) * (t[".hada_w2_a"] @ t[".hada_w2_b"])  # noqa: E731
    parts = core_lora.split_fused(h, (144, 144))
    assert all(torch.equal(prod(p), prod(h)[144 * i:144 * (i + 1)]) for i, p in enumerate(parts))
    assert core_lora.split_fused({**h, ".dora_scale": torch.ones(288, 1)}, (144, 144)) == \
        ".dora_scale on a fused layer cannot be split into its q/k/v parts"
    assert core_lora.split_fused({".lora_up.weight": _rand(200, 2, seed=1), ".lora_down.weight": _rand(2, 144, seed=2)},
                                 (144, 144)) == ".lora_up.weight has 200 rows, the fused layer 288"


def test_describe_lora_names_other_models():
    assert core_lora.describe_lora(["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]) == \
        "a LoRA for a CLIP text encoder only"
    assert "SDXL" not in (core_lora.describe_lora(["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff"]) or "")
    assert core_lora.describe_lora(["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_te2_x"]).startswith(
        "a Stable Diffusion XL LoRA")
    assert core_lora.describe_lora(["transformer.transformer_blocks.0.ff_context.net.0.proj"]) == \
        "a LoRA for an MMDiT model (Flux or Stable Diffusion 3)"
    assert core_lora.describe_lora(["transformer_blocks.0.attn1.to_q", "blocks.0.attn.qkv"]) is None


def test_peft_settings_read_both_metadata_forms():
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                   "text_encoder.r": 2, "text_encoder.lora_alpha": 1})}
    assert core_lora.peft_settings(header, "transformer") == {"r": 4, "lora_alpha": 8}
    assert core_lora.peft_settings(header, "text_encoder") == {"r": 2, "lora_alpha": 1}
    assert core_lora.peft_settings({"lora_adapter_metadata": {"r": 4, "lora_alpha": 16}}, "transformer") == \
        {"r": 4, "lora_alpha": 16}
    assert core_lora.peft_settings({"lora_adapter_metadata": "{not json"}, "transformer") is None
    assert core_lora.peft_settings({"ss_network_alpha": "4"}, "transformer") is None
    assert core_lora.peft_settings(None, "transformer") is None
    conf = {"lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 3}}
    assert core_lora.peft_alpha(conf, "transformer_blocks.0.attn2.to_k", 4) == 3.0
    assert core_lora.peft_alpha(conf, "transformer_blocks.0.attn1.to_k", 4) == 8.0  # the pattern must end the name
    assert core_lora.peft_alpha({**conf, "use_rslora": True}, "transformer_blocks.0.attn1.to_k", 4) == 16.0


def test_read_metadata_takes_adapter_config_beside_the_file(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    meta = core_lora.read_metadata(tmp_path / "adapter_model.safetensors")
    assert meta == {"format": "pt", "lora_adapter_metadata": {"r": 4, "lora_alpha": 2}}
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"lora_adapter_metadata": "{}"})
    assert core_lora.read_metadata(tmp_path / "other.safetensors") == {"lora_adapter_metadata": "{}"}


def test_shape_check_reads_every_adapter_form():
    """A change of another shape than our weight is refused for LoRA, LoHa, LoKr (whole and factored) and full
    diffs; forms whose shape the file does not state (LoCon mid weights) are left to ComfyUI."""
    shapes = {"proj_out.weight": (32, 144)}
    r = lambda *s: torch.zeros(*s)  # noqa: E731
    good = {
        "loha": {".hada_w1_a": r(32, 2), ".hada_w1_b": r(2, 144), ".hada_w2_a": r(32, 2), ".hada_w2_b": r(2, 144)},
        "lokr": {".lokr_w1": r(4, 8), ".lokr_w2": r(8, 18)},
        "lokr_factored": {".lokr_w1_a": r(4, 1), ".lokr_w1_b": r(1, 8), ".lokr_w2_a": r(8, 2), ".lokr_w2_b": r(2, 18)},
        "diff": {".diff": r(32, 144)},
    }
    bad = {
        "loha": {**good["loha"], ".hada_w1_b": r(2, 100)},
        "lokr": {".lokr_w1": r(4, 8), ".lokr_w2": r(8, 20)},
        "lokr_factored": {**good["lokr_factored"], ".lokr_w1_a": r(2, 1)},
        "diff": {".diff": r(32, 143)},
    }
    for kind in good:
        plan = core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in good[kind].items()}, shapes)
        assert plan.dit_map == {"proj_out": "proj_out.weight"}, kind
        with pytest.raises(core_lora.LoraError, match="another size"):
            core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in bad[kind].items()}, shapes)
    assert core_lora.delta_shape({".lora_up.weight": r(32, 2), ".lora_down.weight": r(2, 9), ".lora_mid.weight": r(2, 2, 3, 3)}) is None
    assert core_lora.delta_shape({".lokr_w1": r(4, 8), ".lokr_w2_a": r(8, 2), ".lokr_w2_b": r(2, 18), ".lokr_t2": r(1)}) is None
    assert core_lora.delta_shape({".lokr_w1": r(4, 8), ".lokr_w2_a": r(8, 2), ".lokr_w2_b": r(2, 18)}) == (32, 144)
    assert core_lora.delta_shape({".lora_up.weight": r(32, 2)}) is None
    fmt = lambda kind: core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in good[kind].items()}, shapes).formats  # noqa: E731
    assert fmt("loha") == ["LoHa, kohya names"] and fmt("lokr") == ["LoKr, kohya names"] and fmt("diff") == ["diff, kohya names"]


def test_lokr_factored_forms_split_on_fused_layers():
    w1a, w1b, w2a, w2b = _rand(6, 1, seed=1), _rand(1, 4, seed=2), _rand(72, 2, seed=3), _rand(2, 36, seed=4)
    t = {".lokr_w1_a": w1a, ".lokr_w1_b": w1b, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b}
    whole = torch.kron(w1a @ w1b, w2a @ w2b)
    parts = core_lora.split_fused(t, (144, 144, 144))
    for i, p in enumerate(parts):
        assert torch.equal(torch.kron(p[".lokr_w1_a"] @ p[".lokr_w1_b"], p[".lokr_w2_a"] @ p[".lokr_w2_b"]),
                           whole[144 * i:144 * (i + 1)]) and p[".lokr_w2_b"] is w2b
    t = {".lokr_w1": _rand(1, 4, seed=5), ".lokr_w2_a": _rand(432, 2, seed=6), ".lokr_w2_b": _rand(2, 36, seed=7)}
    whole = torch.kron(t[".lokr_w1"], t[".lokr_w2_a"] @ t[".lokr_w2_b"])
    for i, p in enumerate(core_lora.split_fused(t, (144, 144, 144))):
        assert torch.equal(torch.kron(p[".lokr_w1"], p[".lokr_w2_a"] @ p[".lokr_w2_b"]), whole[144 * i:144 * (i + 1)])
    assert core_lora.split_fused({".lokr_w1": _rand(2, 4, seed=1), ".lokr_w2": _rand(72, 4, seed=1)}, (100, 44)) == \
        "LoKr on a fused layer with unequal parts"
    assert core_lora.split_fused({".lokr_w1": _rand(2, 4, seed=1)}, (144, 144)) == "LoKr without both factors"


def test_fused_rows_come_from_each_part_and_one_weight_takes_one_patch():
    shapes = {f"transformer_blocks.0.attn1.to_{c}.weight": (6, 4) for c in "qkv"}
    targets = core_lora.dit_targets(shapes)
    assert targets["blocks.0.attn.qkv"].rows == (6, 6, 6)
    assert targets["lora_unet_blocks_0_attn_qkv"].params == tuple(shapes)
    sd = {"lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(6, 1),
          "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(1, 4),
          "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(6, 1),
          "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1, 4),
          "odd_counter": torch.zeros(1), "lora_unet_nothing_here.lora_up.weight": torch.zeros(1)}
    plan = core_lora.prepare(sd, shapes)
    assert len(plan.dit_map) == 1 and len(plan.dit) == 2
    assert sorted(plan.unplaced) == [
        "lora_unet_nothing_here.lora_up.weight: no module of the PixArt DiT has this name",
        "odd_counter: not a tensor name a LoRA adapter reads",
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight: transformer_blocks.0.attn1.to_q.weight is already "
        "patched by another key of this file",
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight: transformer_blocks.0.attn1.to_q.weight is already "
        "patched by another key of this file"]


def test_foreign_refusal_needs_most_keys_to_be_foreign():
    """A PixArt LoRA with a few stray SD keys is applied (strays listed); a file mostly of SD keys is refused."""
    shapes = {"proj_out.weight": (2, 2)}
    ours = {"lora_unet_proj_out.lora_up.weight": torch.zeros(2, 1), "lora_unet_proj_out.lora_down.weight": torch.zeros(1, 2)}
    stray = {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{w}.weight": torch.zeros(1) for w in ("up", "down")}
    plan = core_lora.prepare({**ours, "lora_unet_down_blocks_x.alpha": torch.zeros(1)}, shapes)  # 1 of 3 foreign
    assert plan.unplaced == ["lora_unet_down_blocks_x.alpha: no module of the PixArt DiT has this name"]
    with pytest.raises(core_lora.LoraError, match=r"1\.x/2\.x LoRA .*\(e\.g\. lora_unet_down_blocks_0_attentions_0_proj_in\.lora_down"):
        core_lora.prepare({**ours, **stray}, shapes, name="mixed.safetensors")  # 2 of 4: half
    assert core_lora.describe_lora(["unet.down_blocks.1.attentions.0.proj_in", "text_encoder_2.x"]).startswith(
        "a Stable Diffusion XL LoRA")  # diffusers' SDXL naming: a second text encoder


def test_peft_alpha_for_the_t5_part_and_peft_default_adapter_names(dit_model):
    t5 = tiny.make_t5()
    m = "encoder.block.0.layer.0.SelfAttention.q"
    sd = {f"text_encoder.{m}.lora_A.default.weight": torch.zeros(2, 64),
          f"text_encoder.{m}.lora_B.default.weight": torch.zeros(_shapes(t5)[m + ".weight"][0], 2),
          "transformer.proj_out.lora_A.weight": torch.zeros(2, 144), "transformer.proj_out.lora_B.weight": torch.zeros(32, 2),
          "transformer.proj_out.alpha": torch.tensor(5.0)}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 1, "text_encoder.lora_alpha": 6})}
    plan = core_lora.prepare(sd, _shapes(dit_model), _shapes(t5), meta)
    assert plan.t5[m + ".alpha"].item() == 6.0  # text_encoder.lora_alpha, PEFT's lora_A.default naming
    assert plan.dit["proj_out.alpha"].item() == 5.0  # the file's own alpha wins over the metadata
    assert set(plan.t5) == {m + ".lora_A.default.weight", m + ".lora_B.default.weight", m + ".alpha"}
    assert plan.t5_map == {m: m + ".weight"} and plan.dit_map == {"proj_out": "proj_out.weight"}

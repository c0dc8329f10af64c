"""PixArt-Σ LoRA Loader in ComfyUI: every file format against a hand-merged model, stacking, strength 0, unloading,
T5 parts, quantized T5, other models' LoRAs, and the graph in ComfyUI's executor with the DiT offloaded between
prompts.

Expected values come from outside the pack: the merge formula by hand (LoRA W + s·(alpha/rank)·B·A, LoHa
W + s·(alpha/rank)·(w1a·w1b)⊙(w2a·w2b), LoKr W + s·(alpha/rank)·kron(w1, w2a·w2b), as LyCORIS defines them), the
original → diffusers layout of DESIGN.md §3 (fused qkv rows in q, k, v order), PEFT's own forward of its LoRA'd
model, and diffusers' / transformers' forwards of the hand-merged weights.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from harness.graphs import DIT_FILE, graph
from harness.graphs import saved_images as _saved_images
from harness.lora_files import (FORMATS, kohya_diffusers, kohya_lora, kohya_original, merge, peft_adapter, peft_folder,
                                peft_deltas, peft_patterns, shapes_of, write_lora)
from harness.lora_files import t5_lora as _t5_lora
from pixart_core import t5 as ct5

T5_FILE = "tiny_t5xxl_fp16.safetensors"
STRENGTH = 0.7
torch.manual_seed(0)


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


def test_full_diffs_on_fused_and_plain_layers_equal_the_hand_merge(comfy, comfy_base, tiny_models):
    """`diff` / `diff_b` (a full weight / bias difference, as ComfyUI reads them: W + s·diff) on the original
    layout's fused qkv and kv (rows in q, k, v order, DESIGN.md §3: a full difference splits by rows exactly), on
    a plain layer, and a bias difference alone; merged by hand here."""
    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    g = torch.Generator().manual_seed(7)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    qkv, qkv_b, kv, kv_b = rnd(3 * 144, 144), rnd(3 * 144), rnd(2 * 144, 144), rnd(2 * 144)
    out_w, out_b, ff_b = rnd(32, 144), rnd(32), rnd(144)
    sd = {"diffusion_model.blocks.0.attn.qkv.diff": qkv, "diffusion_model.blocks.0.attn.qkv.diff_b": qkv_b,
          "lora_unet_blocks_1_cross_attn_kv_linear.diff": kv, "lora_unet_blocks_1_cross_attn_kv_linear.diff_b": kv_b,
          "lora_unet_proj_out.diff": out_w, "lora_unet_proj_out.diff_b": out_b,
          "transformer.transformer_blocks.1.ff.net.2.diff_b": ff_b}
    deltas = {"proj_out.weight": out_w, "proj_out.bias": out_b, "transformer_blocks.1.ff.net.2.bias": ff_b}
    for i, c in enumerate("qkv"):
        deltas[f"transformer_blocks.0.attn1.to_{c}.weight"] = qkv[144 * i:144 * (i + 1)]
        deltas[f"transformer_blocks.0.attn1.to_{c}.bias"] = qkv_b[144 * i:144 * (i + 1)]
    for i, c in enumerate("kv"):
        deltas[f"transformer_blocks.1.attn2.to_{c}.weight"] = kv[144 * i:144 * (i + 1)]
        deltas[f"transformer_blocks.1.attn2.to_{c}.bias"] = kv_b[144 * i:144 * (i + 1)]
    out, _ = apply(comfy, load_dit(comfy), write_lora(comfy_base, "lora_full_diffs", sd))
    got, want = loaded_weights(out), merge(base_w, (STRENGTH, deltas))
    assert {k[len("inner."):] for k in out.patcher.patches} == set(deltas)
    for k in base_w:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


EPS = torch.finfo(torch.float32).eps


def comfy_dora(w: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA as ComfyUI 0.3.75 merges it (comfy/weight_adapter/base.py, weight_decompose): W + Δ times
    dora_scale / norm, where the norm is that of each output row of the BASE weight W when dora_scale has one
    value per output row (LyCORIS and PEFT take the rows of W + Δ there), else that of each input column of W + Δ
    (as LyCORIS); strength s blends: W + s·(that − W)."""
    full = w + delta
    if scale.shape[0] == w.shape[0]:
        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = full.norm(dim=0, keepdim=True)  # a linear layer's [1, in] scale
    return w + strength * (full * scale / (norm + EPS) - w)


def test_lycoris_dora_merges_as_comfyui_decomposes(comfy, comfy_base, tiny_models):
    """A kohya/LyCORIS DoRA (lora_down / lora_up / alpha + dora_scale): a scale per output row ([out, 1], on a
    linear layer and on the patch-embedding conv) and per input column ([1, in]); the weights are ComfyUI's
    decomposition written out above, at strength 0.7."""
    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    axes = {"transformer_blocks.0.attn1.to_q": "out", "pos_embed.proj": "out", "transformer_blocks.1.ff.net.2": "in"}
    sd = kohya_lora(shapes_of(tiny_models["dit"]), list(axes), rank=4, alpha=2.0, seed=3, scale=0.1)
    g = torch.Generator().manual_seed(4)
    want = dict(base_w)
    for m, axis in axes.items():
        k, w = "lora_unet_" + m.replace(".", "_"), base_w[m + ".weight"]
        delta = (2.0 / 4 * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]).reshape(w.shape)
        norms = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1)) if axis == "out" else \
            (w + delta).norm(dim=0, keepdim=True)
        sd[k + ".dora_scale"] = norms * (1 + 0.2 * torch.randn(norms.shape, generator=g))
        want[m + ".weight"] = comfy_dora(w, delta, sd[k + ".dora_scale"], STRENGTH)
    out, _ = apply(comfy, load_dit(comfy), write_lora(comfy_base, "lora_lycoris_dora", sd))
    got = loaded_weights(out)
    assert len(out.patcher.patches) == 3
    for k in base_w:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


def test_peft_dora_is_comfyui_dora_with_its_magnitude(comfy, comfy_base, tiny_models):
    """PEFT's DoRA (use_dora: lora_A / lora_B and lora_magnitude_vector, one value per output row or channel) on
    linear layers and the patch-embedding conv: the weights are ComfyUI's decomposition (comfy_dora) with PEFT's
    magnitude as dora_scale and PEFT's own change Δ (get_delta_weight). PEFT's merge divides by the row norms of
    W + Δ where ComfyUI divides by those of W: the two differ by exactly that ratio, checked against PEFT's
    merge_and_unload()."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "proj"], use_dora=True, init_lora_weights=False)
    sd, config, model = peft_adapter(tiny_models["dit"], config)
    deltas = peft_deltas(model)
    magnitudes = {n[len("base_model.model."):] + ".weight": m.lora_magnitude_vector["default"].weight.detach().clone()
                  for n, m in model.named_modules() if "default" in getattr(m, "lora_magnitude_vector", {})}
    assert len(magnitudes) == 7 and "pos_embed.proj.weight" in magnitudes
    name = write_lora(comfy_base, "lora_peft_dora", sd, {"adapter_config.json": json.dumps(config.to_dict(), default=list)})
    out, _ = apply(comfy, load_dit(comfy), name, strength=1.0)
    got, peft_merged = loaded_weights(out), model.merge_and_unload().state_dict()
    for k, w in tiny_models["dit"].state_dict().items():
        if k not in magnitudes:
            assert torch.equal(got[k], w), k
            continue
        scale = magnitudes[k].reshape(w.shape[0], *[1] * (w.dim() - 1))
        torch.testing.assert_close(got[k], comfy_dora(w, deltas[k], scale, 1.0), atol=1e-5, rtol=0, msg=k)
        rows = lambda t: t.flatten(1).norm(dim=1).reshape(scale.shape)  # noqa: E731
        torch.testing.assert_close(got[k] * rows(w) / rows(w + deltas[k]), peft_merged[k], atol=1e-5, rtol=0, msg=k)
        assert (got[k] - peft_merged[k]).abs().max() > 1e-3, k


@pytest.mark.parametrize("tucker", [False, True], ids=["locon", "locon_tucker"])
def test_locon_on_the_patch_embedding_conv_equals_its_chained_convolutions(comfy, comfy_base, tiny_models, tucker):
    """LyCORIS LoCon on the DiT's one convolution (pos_embed.proj: a [144, 4, 2, 2] kernel, stride 2): 4-D
    lora_down / lora_up, and with Tucker's lora_mid (down 1x1, mid 2x2, up 1x1). Its change is the kernel of the
    convolutions it chains (LyCORIS's forward: up(mid(down(x)))), written out with einsum here and checked
    against those convolutions run by torch."""
    import torch.nn.functional as F

    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    r, alpha = 3, 1.5
    up = rnd(144, r, 1, 1)
    if tucker:
        down, mid = rnd(r, 4, 1, 1), rnd(r, r, 2, 2)
        kernel = torch.einsum("oa,abkl,bc->ockl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
        chain = lambda x: F.conv2d(F.conv2d(F.conv2d(x, down), mid, stride=2), up)  # noqa: E731
    else:
        down, mid = rnd(r, 4, 2, 2), None
        kernel = torch.einsum("oa,ackl->ockl", up[:, :, 0, 0], down)
        chain = lambda x: F.conv2d(F.conv2d(x, down, stride=2), up)  # noqa: E731
    x = torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(chain(x), F.conv2d(x, kernel, stride=2), atol=1e-5, rtol=0)
    sd = {"lora_unet_pos_embed_proj.lora_down.weight": down, "lora_unet_pos_embed_proj.lora_up.weight": up,
          "lora_unet_pos_embed_proj.alpha": torch.tensor(alpha)}
    if tucker:
        sd["lora_unet_pos_embed_proj.lora_mid.weight"] = mid
    out, _ = apply(comfy, load_dit(comfy), write_lora(comfy_base, f"lora_locon_{tucker}", sd))
    got = loaded_weights(out)
    want = merge(base_w, (STRENGTH, {"pos_embed.proj.weight": alpha / r * kernel}))
    for k in base_w:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


def lycoris_oft(w: torch.Tensor, blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Diagonal OFT as LyCORIS defines it (lycoris/modules/diag_oft.py) and ComfyUI reads it
    (comfy/weight_adapter/oft.py): per block, Q = B − Bᵀ (all blocks scaled to norm `constraint` where theirs is
    larger), the Cayley rotation R = (I + Q)(I − Q)⁻¹, and each block of output rows W_k becomes R_kᵀ·W_k."""
    q = blocks - blocks.transpose(1, 2)
    if constraint > 0 and q.norm() + 1e-8 > constraint:
        q = q * constraint / (q.norm() + 1e-8)
    eye = torch.eye(blocks.shape[1])
    r = (eye + q) @ torch.linalg.inv(eye - q)
    n = blocks.shape[1]
    return torch.cat([r[i].T @ w[i * n:(i + 1) * n] for i in range(blocks.shape[0])])


@pytest.mark.parametrize("strength", [1.0, STRENGTH])
def test_lycoris_oft_rotates_output_blocks(comfy, comfy_base, tiny_models, strength, caplog):
    """LyCORIS OFT (oft_blocks + alpha, its norm constraint): on a square layer without constraint and on
    ff.net.0.proj with one, the weights are the rotated blocks (lycoris_oft above). At strength s ComfyUI 0.3.75
    changes the weight by s² times the change at strength 1 (its OFTAdapter multiplies by strength twice:
    (R·s − s·I)·W, then s· that). On the fused qkv it is not applied (a rotation of a fused layer's blocks under one
    norm constraint does not split into its parts) and is listed."""
    base_w = {k: v.clone() for k, v in tiny_models["dit"].state_dict().items()}
    g = torch.Generator().manual_seed(6)
    layers = {"transformer_blocks.0.attn1.to_out.0": (18, 0.0), "transformer_blocks.1.ff.net.0.proj": (72, 0.5)}
    sd, want = {}, dict(base_w)
    for m, (count, constraint) in layers.items():
        k = "lycoris_" + m.replace(".", "_")
        sd[k + ".oft_blocks"] = torch.randn(count, 8, 8, generator=g) * 0.05
        sd[k + ".alpha"] = torch.tensor(constraint)
        w = base_w[m + ".weight"]
        want[m + ".weight"] = w + strength ** 2 * (lycoris_oft(w, sd[k + ".oft_blocks"], constraint) - w)
    sd["lycoris_blocks_0_attn_qkv.oft_blocks"] = torch.randn(54, 8, 8, generator=g) * 0.05
    with caplog.at_level(logging.WARNING):
        out, _ = apply(comfy, load_dit(comfy), write_lora(comfy_base, "lora_lycoris_oft", sd), strength=strength)
    assert "lycoris_blocks_0_attn_qkv.oft_blocks: .oft_blocks on a fused layer cannot be split" in caplog.text
    got = loaded_weights(out)
    assert len(out.patcher.patches) == 2
    for k in base_w:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


def _peft_config(kind: str):
    """PEFT adapter configs whose scaling (alpha / r) is not 1, with an alpha_pattern: LoHa (its conv in CP form,
    use_effective_conv2d), LoKr with its second factor low-rank (r 4) and whole (r 8: no rank in the file)."""
    from peft import LoHaConfig, LoKrConfig

    targets = ["to_q", "to_v", "to_out.0", "proj"]
    if kind == "loha":
        return LoHaConfig(r=4, alpha=2, alpha_pattern={"to_v": 12}, target_modules=targets, init_weights=False,
                          use_effective_conv2d=True)
    return LoKrConfig(r=4 if kind == "lokr" else 8, alpha=2, alpha_pattern={"to_v": 12}, target_modules=targets,
                      init_weights=False)


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr_whole_factors"])
def test_peft_loha_and_lokr_merge_as_peft_merges(comfy, comfy_base, tiny_models, kind):
    """PEFT's LoHa and LoKr (save_pretrained: the tensors, and alpha only in adapter_config.json): the weights
    ComfyUI runs are PEFT's own merge_and_unload()."""
    sd, config, model = peft_adapter(tiny_models["dit"], _peft_config(kind))
    name = write_lora(comfy_base, f"lora_peft_{kind}", sd, {"adapter_config.json": json.dumps(config.to_dict(), default=list)})
    out, _ = apply(comfy, load_dit(comfy), name, strength=1.0)
    got, want = loaded_weights(out), model.merge_and_unload().state_dict()
    assert len(out.patcher.patches) == 15
    for k in tiny_models["dit"].state_dict():
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)


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
    result = _node(comfy, "PixArtSigmaLoraLoader").execute(dit=dit, lora_name=name, strength=0.0, t5=None)
    out = result.result[0]
    assert out is dit  # nothing patched: the same DiT, no clone
    assert result.ui.as_dict() == {"text": ("lora_zero.safetensors: LoRA, kohya names; DiT: 0 weights patched "
                                            "(strength 0); T5: no T5 keys in this LoRA",)}
    for k, v in loaded_weights(out).items():
        assert torch.equal(v, tiny_models["dit"].state_dict()[k]), k


def test_t5_strength_left_out_of_a_prompt_is_one(comfy, comfy_base, tiny_models):
    """An API prompt written before t5_strength existed has no such input: ComfyUI then passes none, and the T5 part
    applies at 1, as the widget's default (and as ComfyUI's LoraLoader's strength_clip defaults)."""
    t5_sd, _ = _t5_lora(tiny_models["t5"])
    name = write_lora(comfy_base, "lora_t5_default", t5_sd)
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    out = _node(comfy, "PixArtSigmaLoraLoader").execute(dit=load_dit(comfy), lora_name=name, strength=STRENGTH, t5=t5)
    assert {e[0] for entries in out.result[1].patcher.patches.values() for e in entries} == {1.0}


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


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match")  # by design
@pytest.mark.parametrize("writer", ["peft_folder", "diffusers_metadata"])
def test_alpha_and_rank_patterns_merge_as_peft_merges(comfy, comfy_base, tiny_models, writer):
    """A PEFT LoRA whose alpha_pattern / rank_pattern PEFT matches otherwise than a substring search would
    (harness.lora_files.ALPHA_PATTERN), saved by PEFT (adapter_config.json) and by diffusers' writer (metadata
    header, rsLoRA): the weights ComfyUI runs are PEFT's own merge_and_unload()."""
    rslora = writer == "diffusers_metadata"
    sd, config, model = peft_patterns(tiny_models["dit"], rslora)
    if rslora:
        sd = {"transformer." + k[len("base_model.model."):]: v for k, v in sd.items()}
        extra = {"metadata": {f"transformer.{k}": v for k, v in config.to_dict().items()}}
    else:
        extra = {"adapter_config.json": json.dumps(config.to_dict(), default=list)}
    name = write_lora(comfy_base, f"lora_patterns_{writer}", sd, extra)
    out, _ = apply(comfy, load_dit(comfy), name, strength=1.0)
    got, want = loaded_weights(out), model.merge_and_unload().state_dict()
    assert len(out.patcher.patches) == 27
    for k, v in tiny_models["dit"].state_dict().items():
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
        assert ("inner." + k in out.patcher.patches) == (not torch.equal(want[k], v)), k  # PEFT changed these


def _encode(comfy, t5, text="a red fox in the snow"):
    return _node(comfy, "PixArtSigmaTextEncode").execute(t5=t5, positive=text, negative="", max_tokens=300).result[0]


def test_t5_part_equals_hand_merged_t5_and_gets_its_own_embeddings(comfy, comfy_base, tiny_models, tokenizer, caplog):
    t5_model = tiny_models["t5"]
    t5_sd, t5_deltas = _t5_lora(t5_model)
    sd, _, dit_deltas = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_with_t5", {**sd, **t5_sd})
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    base_cond = _encode(comfy, t5)
    with caplog.at_level(logging.INFO):
        dit, new_t5 = apply(comfy, load_dit(comfy), name, t5=t5, t5_strength=0.5)
    assert ("PixArt LoRA lora_with_t5.safetensors: LoRA (PEFT/diffusers), t5 names + LoRA, kohya names + LoRA, t5 names; "
            "DiT: 7 weights patched (strength 0.7); T5: 3 weights patched (strength 0.5)") in [r.getMessage() for r in caplog.records]
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
    ids = tokenizer([ct5.preprocess("a red fox in the snow")], return_tensors="pt")
    with torch.no_grad():
        ref = merged(**ids).last_hidden_state
    assert (cond.embeds - ref).abs().max() <= 1e-5
    assert (cond.embeds - base_cond.embeds).abs().max() > 1e-3
    assert torch.equal(_encode(comfy, t5).embeds, base_cond.embeds)  # the base T5 is unchanged
    assert set(dit_deltas) <= {k[len("inner."):] for k in dit.patcher.patches}


def _merged_t5_embeds(base: dict, deltas: dict, strength: float, tokenizer, text="a red fox in the snow"):
    """transformers' T5 with W + strength·delta merged by hand: the embeddings of `text`."""
    merged = tiny.make_t5()
    merged.load_state_dict({k: v + strength * deltas[k] if k in deltas else v for k, v in base.items()})
    with torch.no_grad():
        return merged(**tokenizer([ct5.preprocess(text)], return_tensors="pt")).last_hidden_state


def test_each_t5_strength_and_lora_file_gets_its_own_embeddings(comfy, comfy_base, tiny_models, tokenizer):
    """Text Encode's embedding cache is keyed by the T5's identity. A LoRA'd T5 at each t5_strength, encoded one
    after the other (the earlier ones cached), gets the embeddings of transformers' T5 with the LoRA merged by hand
    at that strength; strength 0 is the base T5 (its identity, its cached embeddings); a LoRA file replaced under
    the same name (same size, later mtime) gets the new file's embeddings, not the old file's cached ones."""
    t5_sd, deltas = _t5_lora(tiny_models["t5"])
    name = write_lora(comfy_base, "lora_t5_strengths", t5_sd)
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    base = {k: v.half().float() for k, v in tiny_models["t5"].state_dict().items()}  # the file is fp16
    base_embeds = _encode(comfy, t5).embeds
    seen = []
    for strength in (0.5, 1.0, -0.5, 0.5):
        lora_t5 = apply(comfy, load_dit(comfy), name, t5=t5, t5_strength=strength)[1]
        got = _encode(comfy, lora_t5).embeds
        assert (got - _merged_t5_embeds(base, deltas, strength, tokenizer)).abs().max() <= 1e-5, strength
        assert (got - base_embeds).abs().max() > 1e-3
        seen.append(lora_t5.identity)
    assert len(set(seen)) == 3 and seen[0] == seen[3]
    same = apply(comfy, load_dit(comfy), name, t5=t5, t5_strength=0.0)[1]
    assert same.identity == t5.identity and torch.equal(_encode(comfy, same).embeds, base_embeds)

    path = comfy_base / "models" / "loras" / name
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    flipped = {k: -v if ".lora_up." in k or ".lora_B." in k else v for k, v in t5_sd.items()}  # delta -> -delta
    save_file(flipped, str(path))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert path.stat().st_size == size
    got = _encode(comfy, apply(comfy, load_dit(comfy), name, t5=t5, t5_strength=0.5)[1]).embeds
    assert (got - _merged_t5_embeds(base, deltas, -0.5, tokenizer)).abs().max() <= 1e-5


def test_quantized_t5_warns_and_the_dit_part_still_applies(comfy, comfy_base, tiny_models, caplog):
    t5_sd, _ = _t5_lora(tiny_models["t5"])
    sd, _, deltas = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_quant_t5", {**sd, **t5_sd})
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="8-bit (bitsandbytes)",
                                                     dtype="auto").result[0]
    with caplog.at_level(logging.WARNING):
        dit, same_t5 = apply(comfy, load_dit(comfy), name, t5=t5)
    assert same_t5 is t5 and not t5.patcher.patches
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PixArt LoRA" in r.getMessage()] == [
        "PixArt LoRA lora_quant_t5.safetensors: its 8 T5 (text encoder) keys were NOT applied: the T5 is quantized "
        "(8-bit (bitsandbytes)), and a LoRA cannot be merged into bitsandbytes weights. Load the T5 with quantization "
        "'none' to use the LoRA's T5 part (the DiT part is applied)."]
    got = loaded_weights(dit)
    base = tiny_models["dit"].state_dict()
    want = merge(base, (STRENGTH, deltas))
    for k in deltas:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_t5_keys_without_a_t5_are_reported(comfy, comfy_base, tiny_models, caplog):
    t5_sd, _ = _t5_lora(tiny_models["t5"])
    sd, _, _ = kohya_diffusers(tiny_models["dit"])
    name = write_lora(comfy_base, "lora_t5_unconnected", {**sd, **t5_sd})
    with caplog.at_level(logging.INFO):
        dit = load_dit(comfy)
        out = _node(comfy, "PixArtSigmaLoraLoader").execute(dit=dit, lora_name=name, strength=STRENGTH, t5=None,
                                                            t5_strength=1.0)
    assert out.result[1] is None  # no T5 in, none out: Text Encode then says what to connect
    text = ("lora_t5_unconnected.safetensors: LoRA, kohya names; DiT: 7 weights patched (strength 0.7); T5: 8 keys "
            "not applied (no T5 connected)")
    assert out.ui.as_dict() == {"text": (text,)}
    assert [r.getMessage() for r in caplog.records if "PixArt LoRA" in r.getMessage()] == [
        "PixArt LoRA lora_t5_unconnected.safetensors: its 8 T5 (text encoder) keys were NOT applied: no T5 is "
        "connected to the LoRA loader. Connect the T5 loader to its t5 input and use its t5 output.",
        f"PixArt LoRA {text}"]


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
    assert [r.getMessage() for r in caplog.records if "NOT applied" in r.getMessage()] == [
        "PixArt LoRA lora_extra_keys.safetensors: 3 keys NOT applied (they match no PixArt layer):\n"
        "  lora_unet_transformer_blocks_7_attn1_to_q.lora_down.weight: no module of the PixArt DiT has this name\n"
        "  lora_unet_transformer_blocks_7_attn1_to_q.lora_up.weight: no module of the PixArt DiT has this name\n"
        "  some_counter: not a tensor name a LoRA adapter reads"]
    assert len(dit.patcher.patches) == 7


def test_other_model_lora_fails_the_node_clearly(executor, comfy_base):
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}
    name = write_lora(comfy_base, "sdxl_style", sd)
    result = executor.run(with_loras(graph(prefix="foreign"), [(name, 1.0)]))
    assert not result["ok"]
    message = result["error"]["exception_message"]
    assert "sdxl_style.safetensors: this is a Stable Diffusion XL LoRA" in message and "not a PixArt LoRA" in message


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


def test_two_lora_files_of_the_same_size_and_time_get_their_own_t5_embeddings(comfy, comfy_base, tiny_models):
    """The LoRA'd T5's embedding-cache identity names the file: two T5 LoRA files of equal size and modification time
    (same layout, other values), at the same strength, must not share cached embeddings."""
    import os

    t5_sd, _ = _t5_lora(tiny_models["t5"])
    other = {k: v * 2 for k, v in t5_sd.items()}
    names = [write_lora(comfy_base, "lora_same_a", t5_sd), write_lora(comfy_base, "lora_same_b", other)]
    loras = comfy_base / "models" / "loras"
    stamp = (loras / names[0]).stat().st_mtime_ns
    for n in names:
        os.utime(loras / n, ns=(stamp, stamp))
    assert (loras / names[0]).stat().st_size == (loras / names[1]).stat().st_size
    t5 = _node(comfy, "PixArtSigmaT5Loader").execute(t5_name=T5_FILE, quantization="none", dtype="fp32").result[0]
    dit = load_dit(comfy)
    a, b = (apply(comfy, dit, n, t5=t5, t5_strength=0.5)[1] for n in names)
    assert a.identity != b.identity
    assert not torch.equal(_encode(comfy, a).embeds, _encode(comfy, b).embeds)

"""LoRA files read without ComfyUI (pixart_core.lora): every format's keys placed on the DiT and T5 weights they
change (fused qkv/kv rows split in q, k, v order, DESIGN.md §3), PEFT's scaling as ComfyUI's alpha, the shape checks,
and other models' LoRAs refused by name. The files and their hand-computed changes come from harness.lora_files."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from harness.lora_files import (ALPHA_PATTERN, ORIGINAL_PLAIN, diffusers_file, kohya_diffusers, kohya_lora,
                                kohya_original, peft_adapter, peft_bare, peft_deltas, peft_folder, peft_patterns)
from harness.lora_files import rand as _rand
from harness.lora_files import shapes_of as _shapes
from harness.lora_files import t5_lora as _t5_lora
from pixart_core import files
from pixart_core import lora as core_lora
from pixart_core import lora_keys


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


def test_lora_for_another_size_is_refused(tiny_models):
    sd = kohya_lora({"transformer_blocks.0.attn1.to_q.weight": (1152, 1152)}, ["transformer_blocks.0.attn1.to_q"])
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


def _peft_scalings(model) -> dict[str, float]:
    """PEFT's own scaling of each layer it made (LoraLayer.scaling), by module name in the DiT."""
    return {n[len("base_model.model."):]: m.scaling["default"] for n, m in model.named_modules()
            if "default" in getattr(m, "scaling", {})}


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys did not match")  # PEFT agrees: by design
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_alpha_and_rank_patterns_match_module_names_as_peft_does(dit_model, rslora):
    """alpha_pattern / rank_pattern keys picked where PEFT's matching (a key ends the module name after a dot, a
    regex, the first matching key wins) and a substring search disagree (harness.lora_files.ALPHA_PATTERN): PEFT's
    own layers say which scaling each module got, and ComfyUI's alpha / rank in the plan is that scaling."""
    sd, config, model = peft_patterns(dit_model, rslora)
    meta = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)}
    plan = core_lora.prepare(sd, _shapes(dit_model), metadata=meta)
    scalings = _peft_scalings(model)
    assert set(scalings) == set(plan.dit_map) and len(scalings) == 27
    ranks = {m: plan.dit[m + ".lora_A.weight"].shape[0] for m in scalings}
    for module, scaling in scalings.items():
        assert plan.dit[module + ".alpha"].item() / ranks[module] == pytest.approx(scaling, rel=1e-6), module
    assert set(ranks.values()) == {2, 3, 4, 8}  # rank_pattern reached the tensors PEFT made (6: no module)
    # the patterns tell the rules apart: a substring search would have scaled these modules otherwise
    searched = {m: next((v for p, v in ALPHA_PATTERN.items() if re.search(p, m)), config.lora_alpha) for m in scalings}
    root = (lambda r: r ** 0.5) if rslora else (lambda r: r)  # noqa: E731
    differ = sorted(m for m in scalings if searched[m] / root(ranks[m]) != pytest.approx(scalings[m]))
    assert differ == ["adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
                      "caption_projection.linear_1", "caption_projection.linear_2", "proj_out",
                      "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_out.0",
                      "transformer_blocks.1.attn1.to_out.0", "transformer_blocks.1.attn1.to_q",
                      "transformer_blocks.1.attn2.to_out.0"]


def test_t5_names_and_text_encoder_keys_without_a_t5(dit_model):
    t5 = tiny.make_t5()
    sd, _ = _t5_lora(t5)
    plan = core_lora.prepare(sd, _shapes(dit_model), _shapes(t5))
    assert plan.t5_map == {m: m + ".weight" for m in ("encoder.block.0.layer.0.SelfAttention.q",
                                                     "encoder.block.1.layer.1.DenseReluDense.wi_0",
                                                     "encoder.block.0.layer.1.DenseReluDense.wo")}
    assert sorted(plan.t5_keys) == sorted(sd) and plan.unplaced == [] and plan.dit_map == {}
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="te.safetensors")  # no T5 to put them on
    assert str(e.value) == ("te.safetensors: this LoRA has only text-encoder (T5) keys. Connect the T5 from PixArt-Σ T5 "
                            "Loader to this node's t5 input (and use its t5 output for Text Encode).")
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
    assert core_lora.split_fused({**h, ".hada_t1": torch.ones(2, 2), ".dora_scale": torch.ones(288, 1)}, (144, 144)) == \
        ".dora_scale, .hada_t1 on a fused layer cannot be split into its q/k/v parts"
    assert core_lora.split_fused({".lora_up.weight": _rand(200, 2, seed=1), ".lora_down.weight": _rand(2, 144, seed=2)},
                                 (144, 144)) == ".lora_up.weight has 200 rows, the fused layer 288"


def test_describe_lora_names_other_models():
    assert lora_keys.describe_lora(["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"]) == \
        "a LoRA for a CLIP text encoder only"
    assert "SDXL" not in (lora_keys.describe_lora(["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff"]) or "")
    assert lora_keys.describe_lora(["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_te2_x"]).startswith(
        "a Stable Diffusion XL LoRA")
    assert lora_keys.describe_lora(["transformer.transformer_blocks.0.ff_context.net.0.proj"]) == \
        "a LoRA for an MMDiT model (Flux or Stable Diffusion 3)"
    assert lora_keys.describe_lora(["transformer_blocks.0.attn1.to_q", "blocks.0.attn.qkv"]) is None


def test_peft_settings_read_both_metadata_forms():
    from peft import LoraConfig

    header = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                   "text_encoder.r": 2, "text_encoder.lora_alpha": 1})}
    assert core_lora.peft_settings(header, "transformer") == {"r": 4, "lora_alpha": 8}
    assert core_lora.peft_settings(header, "text_encoder") == {"r": 2, "lora_alpha": 1}
    assert core_lora.peft_settings({"lora_adapter_metadata": {"r": 4, "lora_alpha": 16}}, "transformer") == \
        {"r": 4, "lora_alpha": 16}
    assert core_lora.peft_settings({"lora_adapter_metadata": "{not json"}, "transformer") is None
    assert core_lora.peft_settings({"ss_network_alpha": "4"}, "transformer") is None
    # a header's own "alpha" is no LoRA config: a LoRA's is lora_alpha, and diffusers reads only lora_adapter_metadata
    # (diffusers/utils/state_dict_utils.py, _load_sft_state_dict_metadata)
    assert core_lora.peft_settings({"format": "pt", "alpha": "2"}, "transformer") is None
    assert core_lora.peft_settings(None, "transformer") is None
    # PEFT's adapter_config.json itself, as read from the file, is a config; another component's keys are not its own
    config = json.loads(json.dumps(LoraConfig(r=4, lora_alpha=8).to_dict(), default=list))
    assert core_lora.peft_settings(config, "transformer") == config
    assert core_lora.peft_settings({"r": 4, "lora_alpha": 8, "text_encoder.r": 2, "text_encoder.lora_alpha": 1},
                                   "transformer") == {"r": 4, "lora_alpha": 8}
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
    # a LoKr half that is no matrix (ComfyUI multiplies the halves with torch.mm) states no shape either
    assert core_lora.delta_shape({".lokr_w1": r(4, 8), ".lokr_w2_a": r(8, 2, 1), ".lokr_w2_b": r(2, 18)}) is None
    with pytest.raises(core_lora.LoraError, match=r"proj_out makes a \[1, 144\] change for proj_out.weight \[32, 144\]"):
        core_lora.prepare({"lora_unet_proj_out.diff": r(1, 144)}, shapes)  # one row: a diff cut short
    fmt = lambda kind: core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in good[kind].items()}, shapes).formats  # noqa: E731
    assert fmt("loha") == ["LoHa, kohya names"] and fmt("lokr") == ["LoKr, kohya names"] and fmt("diff") == ["diff, kohya names"]
    assert core_lora.prepare({"lora_unet_proj_out.diff": r(32, 144), "lora_unet_proj_out.diff_b": r(32)},
                             {**shapes, "proj_out.bias": (32,)}).formats == ["diff/diff_b, kohya names"]


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
    targets = lora_keys.dit_targets(shapes)
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
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare({**ours, **stray}, shapes, name="mixed.safetensors")  # 2 of 4: half
    assert str(e.value) == (
        "mixed.safetensors: this is a Stable Diffusion 1.x/2.x LoRA (UNet keys such as input_blocks / down_blocks), not "
        "a PixArt LoRA (e.g. lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight). Use it with the model it "
        "was made for; PixArt-Σ/α needs a LoRA trained on PixArt.")
    assert lora_keys.describe_lora(["unet.down_blocks.1.attentions.0.proj_in", "text_encoder_2.x"]).startswith(
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


def test_peft_dora_magnitude_becomes_comfyui_dora_scale(dit_model):
    """PEFT's lora_magnitude_vector (one value per output row; [1, out, 1, 1] on a conv) is handed to ComfyUI as
    the dora_scale it reads, one per output row; a magnitude of another length is refused like any other misfit,
    and one on a fused layer is listed (its norm does not split into q, k, v)."""
    shapes = _shapes(dit_model)
    mag, conv_mag = torch.rand(32) + 0.5, torch.rand(1, 144, 1, 1) + 0.5
    sd = {"transformer.proj_out.lora_A.weight": _rand(2, 144, seed=1), "transformer.proj_out.lora_B.weight": _rand(32, 2, seed=2),
          "transformer.proj_out.lora_magnitude_vector": mag,
          "pos_embed.proj.lora_A.weight": _rand(2, 4, 2, 2, seed=3), "pos_embed.proj.lora_B.weight": _rand(144, 2, 1, 1, seed=4),
          "pos_embed.proj.lora_magnitude_vector.weight": conv_mag}
    plan = core_lora.prepare(sd, shapes)
    assert torch.equal(plan.dit["proj_out.dora_scale"], mag[:, None])
    assert torch.equal(plan.dit["pos_embed.proj.dora_scale"], conv_mag.reshape(144, 1, 1, 1))
    assert not [k for k in plan.dit if "magnitude" in k] and not plan.unplaced
    with pytest.raises(core_lora.LoraError, match=r"DoRA magnitude has 31 values for 32 output rows.*another size"):
        core_lora.prepare({**sd, "transformer.proj_out.lora_magnitude_vector": mag[:31]}, shapes)
    fused = {"blocks.0.attn.qkv.lora_A.weight": _rand(2, 144, seed=5), "blocks.0.attn.qkv.lora_B.weight": _rand(432, 2, seed=6),
             "blocks.0.attn.qkv.lora_magnitude_vector": torch.rand(432)}
    plan = core_lora.prepare({**sd, **fused}, shapes)
    assert plan.unplaced == [f"{k}: .lora_magnitude_vector on a fused layer cannot be split into its q/k/v parts"
                             for k in sorted(fused)]


def test_peft_oft_is_refused_saying_what_it_is_and_what_to_do(dit_model):
    """PEFT's OFT (oft_R: a packed rotation of the input side) is no form ComfyUI's weight adapters read (its OFT
    adapter reads LyCORIS's oft_blocks, comfy/weight_adapter/oft.py): a file of it is refused naming the tensor,
    PEFT's OFT and what to do, not as "no key names a module"; beside a LoRA its tensors are listed."""
    from peft import OFTConfig

    sd, _, _ = peft_adapter(dit_model, OFTConfig(r=0, oft_block_size=8, target_modules=["to_q", "proj"], init_weights=False))
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="oft.safetensors")
    message = str(e.value)
    assert message.startswith("oft.safetensors: its tensors name PixArt layers, but in a form no weight adapter of "
                              "ComfyUI reads: oft_R.weight (PEFT's OFT)"), message
    assert "merge_and_unload" in message and "no key of this file" not in message
    kohya, _, _ = kohya_diffusers(dit_model)
    plan = core_lora.prepare({**kohya, **sd}, _shapes(dit_model))
    assert len(plan.dit_map) == 7 and len(plan.unplaced) == len(sd)
    assert plan.unplaced[0] == ("base_model.model.pos_embed.proj.oft_R.weight: oft_R.weight (PEFT's OFT) is not a "
                                "tensor any weight adapter of ComfyUI reads")


def test_a_bias_difference_of_another_length_is_refused(dit_model):
    """A `diff_b` whose length is not the layer's bias is refused like a weight of another size (ComfyUI would
    skip it with a shape-mismatch warning while the node counted it as patched); one that fits is placed; on a fused
    layer one whose rows do not add up is listed."""
    shapes = _shapes(dit_model)
    plan = core_lora.prepare({"lora_unet_proj_out.diff_b": torch.zeros(32)}, shapes)
    assert plan.dit_map == {"proj_out": "proj_out.weight"} and set(plan.dit) == {"proj_out.diff_b"}
    with pytest.raises(core_lora.LoraError, match=r"proj_out makes a \[31\] change for proj_out.bias \[32\].*another size"):
        core_lora.prepare({"lora_unet_proj_out.diff_b": torch.zeros(31)}, shapes)
    plan = core_lora.prepare({"lora_unet_proj_out.diff_b": torch.zeros(32), "blocks.0.attn.qkv.diff_b": torch.zeros(429)},
                             shapes)  # on a fused layer, rows that do not add up are listed, as for any tensor
    assert plan.unplaced == ["blocks.0.attn.qkv.diff_b: .diff_b has 429 rows, the fused layer 432"]


def test_peft_adalora_is_refused_not_applied_without_its_singular_values(dit_model):
    """PEFT's AdaLoRA stores each change as lora_B @ (lora_A * lora_E) (lora_E: the learned singular values), under
    the same `lora_A`/`lora_B` names as a LoRA. No weight adapter of ComfyUI reads lora_E: applied as a LoRA, the
    change would be another one, so the file is refused, saying what it is and what to do."""
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["to_q", "to_k"], init_lora_weights=False)
    sd, _, model = peft_adapter(dit_model, config)
    layer = model.base_model.model.transformer_blocks[0].attn1.to_q
    as_lora = layer.lora_B["default"] @ layer.lora_A["default"]  # what a LoRA reading of its two tensors applies
    merged = layer.get_delta_weight("default")  # PEFT's own change for this layer
    assert not torch.allclose(as_lora * layer.scaling["default"], merged, atol=1e-6)
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="adalora.safetensors")
    message = str(e.value)
    assert message.startswith("adalora.safetensors: base_model.model.transformer_blocks.0.attn1.to_k (and 7 more) has "
                              "lora_E (PEFT's AdaLoRA) beside the LoRA tensors"), message
    assert "merge_and_unload" in message


def test_split_key_cuts_the_longest_adapter_suffix_off_a_module_name():
    assert lora_keys.split_key("transformer_blocks.0.attn1.to_q.lora_A.default.weight") == (
        "transformer_blocks.0.attn1.to_q", ".lora_A.default.weight")
    assert lora_keys.split_key("lora_unet_proj_out.alpha") == ("lora_unet_proj_out", ".alpha")
    assert lora_keys.split_key(".alpha") is None  # a suffix alone names no module
    assert lora_keys.split_key("proj_out.weight_scale") is None


def test_the_tied_t5_embedding_is_named_once_as_shared():
    """transformers' T5EncoderModel lists its one embedding twice (shared.weight and encoder.embed_tokens.weight, the
    same tensor): LoRA names go to shared only, so a patch can never reach that tensor twice."""
    t5 = tiny.make_t5()
    shapes = _shapes(t5)
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(shapes)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    targets = lora_keys.t5_targets(shapes)
    assert targets["text_encoder.shared"].params == ("shared.weight",)
    assert not [a for a in targets if "embed_tokens" in a]


def test_a_t5_lora_reports_its_formats_with_t5_names(dit_model):
    t5 = tiny.make_t5()
    sd, _ = _t5_lora(t5)  # kohya lora_te_ keys and PEFT text_encoder. keys
    plan = core_lora.prepare(sd, _shapes(dit_model), _shapes(t5))
    assert plan.formats == ["LoRA (PEFT/diffusers), t5 names", "LoRA, t5 names"]


def test_an_sdxl_lora_in_diffusers_form_is_told_from_sd15():
    """Dots or underscores: a UNet level with a second transformer block is SDXL's (SD1.x/2.x have one per level)."""
    sdxl = ["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight"]
    assert lora_keys.describe_lora(sdxl) == "a Stable Diffusion XL LoRA (UNet keys such as input_blocks / down_blocks)"
    sd15 = ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert lora_keys.describe_lora(sd15) == \
        "a Stable Diffusion 1.x/2.x LoRA (UNet keys such as input_blocks / down_blocks)"


def _comfy_lycoris_change(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The change ComfyUI 0.3.75 makes at strength 1 from one module's LoHa or LoKr tensors, in float32
    (comfy/weight_adapter/loha.py and lokr.py, calculate_weight; comfy/lora.py reads `.alpha` as a float): LoHa
    (w1a·w1b)⊙(w2a·w2b)·alpha/rows(w1b); LoKr kron(w1, w2), each factor whole or a·b, ·alpha/dim where dim is the
    rows of w2_b (else of w1_b) and the scale is 1 without an alpha or without a factored factor."""
    f = {s: v.float() for s, v in t.items()}
    alpha = f[".alpha"].item() if ".alpha" in f else None
    if ".hada_w1_a" in f:
        scale = alpha / f[".hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (f[".hada_w1_a"] @ f[".hada_w1_b"]) * (f[".hada_w2_a"] @ f[".hada_w2_b"]) * scale
    dim, w1, w2 = None, f.get(".lokr_w1"), f.get(".lokr_w2")
    if w1 is None:
        dim, w1 = f[".lokr_w1_b"].shape[0], f[".lokr_w1_a"] @ f[".lokr_w1_b"]
    if w2 is None:
        dim, w2 = f[".lokr_w2_b"].shape[0], f[".lokr_w2_a"] @ f[".lokr_w2_b"]
    return torch.kron(w1, w2) * (alpha / dim if alpha is not None and dim is not None else 1.0)


def _lycoris_config(kind: str):
    """PEFT LoHa / LoKr configs whose scaling alpha / r is no power of two where the file keeps both factors whole
    (a bf16 factor scaled by it would round), with each layout PEFT's LoKr writes: w2 low-rank (r 4), both low-rank
    (decompose_both), w1 low-rank and w2 whole (decompose_factor 36 makes w2 small), both whole (r 16, rank_pattern;
    PEFT's default r 8)."""
    from peft import LoHaConfig, LoKrConfig

    common = {"target_modules": ["to_q", "to_v", "proj_out"], "init_weights": False}
    return {"loha": lambda: LoHaConfig(r=4, alpha=3, alpha_pattern={"to_v": 12}, **common),
            "lokr_w2_low_rank": lambda: LoKrConfig(r=4, alpha=3, alpha_pattern={"to_v": 12}, **common),
            "lokr_both_low_rank": lambda: LoKrConfig(r=2, alpha=3, decompose_both=True, **common),
            "lokr_w1_low_rank": lambda: LoKrConfig(r=4, alpha=3, decompose_both=True, decompose_factor=36, **common),
            "lokr_both_whole": lambda: LoKrConfig(r=16, alpha=2, rank_pattern={"to_q": 32}, **common),
            "lokr_default_r": lambda: LoKrConfig(alpha=2, **common)}[kind]()


@pytest.mark.filterwarnings(r"ignore:Unexpected keyword arguments \['use_rslora'\]")  # PEFT drops it: the point
@pytest.mark.parametrize("kind", ["loha", "lokr_w2_low_rank", "lokr_both_low_rank", "lokr_w1_low_rank", "lokr_both_whole",
                                  "lokr_default_r"])
def test_peft_loha_and_lokr_scaling_reaches_comfyui_exactly(dit_model, tmp_path, kind):
    """A PEFT LoHa / LoKr saved in bf16 with its adapter_config.json (alpha only there): the change ComfyUI makes
    from the plan is PEFT's own get_delta_weight of the same bf16 factors, to float32 rounding, for every factor
    layout PEFT writes. The config carries a stray `use_rslora` (a LoRA field): PEFT's loader drops it, its LoHa and
    LoKr have no rsLoRA, so the scaling stays alpha / r. A minimal config may leave r out: PEFT's default (8) holds."""
    from peft import PeftConfig, get_peft_model_state_dict

    _, config, model = peft_adapter(dit_model, _lycoris_config(kind))
    with torch.no_grad():  # the adapter as a bf16 file holds it: PEFT's factors rounded to bf16 values
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(p.to(torch.bfloat16).float())
    save_file({k: v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(model).items()},
              str(tmp_path / "adapter_model.safetensors"))
    written = {k: v for k, v in config.to_dict().items() if not (kind == "lokr_default_r" and k == "r")}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**written, "use_rslora": True}, default=list))
    assert PeftConfig.from_pretrained(str(tmp_path)).to_dict() == config.to_dict()  # PEFT drops use_rslora
    path = tmp_path / "adapter_model.safetensors"
    plan = core_lora.prepare(files.read_state_dict(path), _shapes(dit_model), metadata=core_lora.read_metadata(path))
    deltas = peft_deltas(model)
    assert {p for p in plan.dit_map.values()} == set(deltas) and len(deltas) == 9
    for canon, param in plan.dit_map.items():
        part = {k[len(canon):]: v for k, v in plan.dit.items() if k.startswith(canon + ".")}
        torch.testing.assert_close(_comfy_lycoris_change(part).reshape(deltas[param].shape), deltas[param],
                                   rtol=1e-5, atol=1e-7, msg=param)


# One PEFT adapter module of each kind on proj_out ([32, 144]) at rank 2: LoRA (lora_A / lora_B, without .weight as
# some writers name them), LoHa, LoKr (w1 [4, 12] whole, w2 [8, 12] = w2_a·w2_b).
PEFT_PARTS = {"LORA": {".lora_A": (2, 144), ".lora_B": (32, 2)},
              "LOHA": {".hada_w1_a": (32, 2), ".hada_w1_b": (2, 144), ".hada_w2_a": (32, 2), ".hada_w2_b": (2, 144)},
              "LOKR": {".lokr_w1": (4, 12), ".lokr_w2_a": (8, 2), ".lokr_w2_b": (2, 12)}}


def _peft_type_spellings():
    from peft import PeftType

    return {"as_saved": lambda k: k, "lower": str.lower, "str_of_the_enum": lambda k: str(PeftType[k]),
            "qualified_name": lambda k: f"{PeftType.__module__}.{PeftType[k]}"}


@pytest.mark.parametrize("spelling", ["as_saved", "lower", "str_of_the_enum", "qualified_name"])
@pytest.mark.parametrize("kind", list(PEFT_PARTS))
def test_a_peft_config_gives_its_alpha_to_its_own_adapter_only(dit_model, kind, spelling):
    """A PEFT config (LoRA, LoHa, LoKr; peft_type as saved, lower case, or str() of PEFT's PeftType enum with its
    class or module path in front) gives its alpha to that adapter's module: PEFT's scaling is alpha / r = 3 / 2,
    ComfyUI's alpha / the factors' rank 2, so alpha 3. A full difference beside it (`.diff`: a layer trained whole,
    which ComfyUI adds unscaled) is no part of the adapter and gets none."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    config = {"LORA": LoraConfig(r=2, lora_alpha=3), "LOHA": LoHaConfig(r=2, alpha=3), "LOKR": LoKrConfig(r=2, alpha=3)}[kind]
    meta = json.loads(json.dumps(config.to_dict(), default=list))
    meta["peft_type"] = _peft_type_spellings()[spelling](meta["peft_type"])
    sd = {f"proj_out{s}": _rand(*shape, seed=i) for i, (s, shape) in enumerate(PEFT_PARTS[kind].items())}
    diff = _rand(144, 144, seed=9)
    plan = core_lora.prepare({**sd, "transformer_blocks.0.attn1.to_q.diff": diff}, _shapes(dit_model),
                             metadata={"lora_adapter_metadata": meta})
    assert plan.dit["proj_out.alpha"].item() == 3.0
    assert set(plan.dit) == {k for k in sd} | {"proj_out.alpha", "transformer_blocks.0.attn1.to_q.diff"}
    assert plan.dit["transformer_blocks.0.attn1.to_q.diff"] is diff and not plan.unplaced


def test_a_clip_text_encoder_lora_is_named_even_with_a_t5_connected(dit_model):
    """An SD text-encoder-only LoRA (lora_te_ keys, as T5 LoRAs have) with a T5 connected names none of its modules:
    the refusal says what the file is and lists its first keys, not "connect the T5"."""
    sd = {f"lora_te_text_model_encoder_layers_{n}_mlp_fc1.lora_{w}.weight": torch.zeros(1) for n in range(3)
          for w in ("down", "up")}
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), _shapes(tiny.make_t5()), name="clip.safetensors")
    assert str(e.value) == (
        "clip.safetensors: no key of this file names a module of the PixArt DiT or T5 (it looks like a LoRA for a CLIP "
        "text encoder only; first keys: lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight, "
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight, "
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight). Choose a LoRA trained on PixArt-Σ/α.")


def test_a_umt5_encoder_chosen_as_a_lora_is_named_by_its_vocabulary(dit_model):
    """A text encoder file picked in the LoRA list is told by its shapes: umT5's 256384-token embedding (shapes are all
    that is read, so the tensors sit on the meta device)."""
    sd = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.empty(8, 8, device="meta"),
          "shared.weight": torch.empty(256384, 8, device="meta")}
    with pytest.raises(core_lora.LoraError, match=r"it looks like a umT5 text encoder \(256384-token vocabulary; PixArt "
                                                  r"needs T5-v1\.1-XXL with 32128 tokens\); first keys"):
        core_lora.prepare(sd, _shapes(dit_model), name="umt5.safetensors")


def test_peft_vera_is_refused_naming_each_of_its_tensors(dit_model):
    """PEFT's VeRA (a shared random projection scaled per layer by vera_lambda_b / vera_lambda_d) is no form a weight
    adapter of ComfyUI reads: the refusal names both tensors and says what to do."""
    from peft import VeraConfig

    sd, _, _ = peft_adapter(dit_model, VeraConfig(r=4, target_modules=["to_q", "to_k"]))
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="vera.safetensors")
    assert str(e.value) == (
        "vera.safetensors: its tensors name PixArt layers, but in a form no weight adapter of ComfyUI reads: "
        "vera_lambda_b (PEFT's VeRA), vera_lambda_d (PEFT's VeRA). ComfyUI applies LoRA/LoCon, LoHa, LoKr, LyCORIS's "
        "OFT and BOFT, GLoRA, DoRA and full differences (diff); merge this adapter into the DiT (PEFT: "
        "merge_and_unload()) and load the merged checkpoint instead.")


@pytest.mark.filterwarnings(r"ignore:Adapter .default.. 4 LoRA tensor\(s\) have invalid shape")  # PEFT: the 1-D bias
def test_peft_lora_bias_is_refused_naming_the_tensor(dit_model):
    """PEFT's lora_bias (a trained bias beside lora_B, LoraConfig(lora_bias=True)) is read by no weight adapter of
    ComfyUI (comfy/weight_adapter/lora.py reads up, down, mid and alpha): without it the change is wrong, so the
    file is refused, naming the tensor as the file has it."""
    from peft import LoraConfig

    sd, _, _ = peft_adapter(dit_model, LoraConfig(r=2, target_modules=["to_q"], lora_bias=True, init_lora_weights=False))
    assert "base_model.model.transformer_blocks.0.attn1.to_q.lora_B.bias" in sd
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="bias.safetensors")
    assert str(e.value).startswith("bias.safetensors: base_model.model.transformer_blocks.0.attn1.to_q (and 3 more) has "
                                   "lora_B.bias beside the LoRA tensors; no weight adapter of ComfyUI reads it"), str(e.value)



@pytest.mark.parametrize("strided", [("w1",), ("w2",), ("w1", "w2")])
def test_a_fused_lokr_from_a_pickle_splits_into_factors_torch_kron_takes(tmp_path, strided):
    """A pickled LoRA (.pt) keeps a tensor's strides (here transposed LoKr factors), and torch.kron, which ComfyUI's
    LoKr adapter calls (comfy/weight_adapter/lokr.py), fails on factors of mixed layouts: each part of a fused qkv
    gets factors it takes, whose product is the fused change's rows, and every part the same whole factor (not one
    copy each)."""
    w = {"w1": _rand(6, 4, seed=1), "w2": _rand(72, 36, seed=2)}
    torch.save({k: v.t().contiguous().t() if k in strided else v for k, v in w.items()}, tmp_path / "lokr.pt")
    sd = files.read_state_dict(tmp_path / "lokr.pt")
    assert [k for k in sd if not sd[k].is_contiguous()] == list(strided)
    parts = core_lora.split_fused({".lokr_w1": sd["w1"], ".lokr_w2": sd["w2"]}, (144, 144, 144))
    whole = torch.kron(w["w1"], w["w2"])
    for i, part in enumerate(parts):
        assert torch.equal(torch.kron(part[".lokr_w1"], part[".lokr_w2"]), whole[144 * i:144 * (i + 1)])
    assert parts[0][".lokr_w2"] is parts[1][".lokr_w2"] is parts[2][".lokr_w2"]


@pytest.mark.parametrize("strided", [("w1",), ("w2",)])
def test_a_lokr_from_a_pickle_reaches_comfyui_with_factors_torch_kron_takes(tmp_path, strided):
    """The same on a plain layer: torch.kron (ComfyUI's LoKr adapter) fails on a strided factor (torch 2.14: "view
    size is not compatible"), so the factors it gets are its own values, laid out contiguously."""
    w = {"w1": _rand(4, 8, seed=3), "w2": _rand(8, 18, seed=4)}
    torch.save({k: v.t().contiguous().t() if k in strided else v for k, v in w.items()}, tmp_path / "lokr.pt")
    sd = files.read_state_dict(tmp_path / "lokr.pt")
    assert [k for k in sd if not sd[k].is_contiguous()] == list(strided)
    plan = core_lora.prepare({f"lora_unet_proj_out.lokr_{k}": v for k, v in sd.items()}, {"proj_out.weight": (32, 144)})
    w1, w2 = plan.dit["proj_out.lokr_w1"], plan.dit["proj_out.lokr_w2"]
    assert torch.equal(torch.kron(w1, w2), torch.kron(w["w1"], w["w2"]))


@pytest.mark.parametrize("kind, missing", [
    ("loha", ".hada_w1_a"), ("loha", ".hada_w1_b"), ("loha", ".hada_w2_a"), ("loha", ".hada_w2_b"),
    ("lokr", ".lokr_w1"), ("lokr", ".lokr_w2"),
    ("lokr_factored", ".lokr_w1_a"), ("lokr_factored", ".lokr_w1_b"),
    ("lokr_factored", ".lokr_w2_a"), ("lokr_factored", ".lokr_w2_b")])
def test_a_loha_or_lokr_without_a_factor_is_refused_naming_it(kind, missing):
    """ComfyUI's LoHa adapter reads all four hada tensors and its LoKr adapter each factor whole or as both halves
    (comfy/weight_adapter/loha.py, lokr.py); they fail on a module without one or skip it, so loading refuses it,
    naming the module and the tensor it lacks (for a missing whole LoKr factor, its first half)."""
    r = lambda *s: torch.zeros(*s)  # noqa: E731
    full_of = {
        "loha": {".hada_w1_a": r(32, 2), ".hada_w1_b": r(2, 144), ".hada_w2_a": r(32, 2), ".hada_w2_b": r(2, 144)},
        "lokr": {".lokr_w1": r(4, 8), ".lokr_w2": r(8, 18)},
        "lokr_factored": {".lokr_w1_a": r(4, 1), ".lokr_w1_b": r(1, 8), ".lokr_w2_a": r(8, 2), ".lokr_w2_b": r(2, 18)},
    }.get
    full = full_of(kind)
    named = {missing.replace(".lokr_w1", ".lokr_w1_a").replace(".lokr_w2", ".lokr_w2_a") if kind == "lokr" else missing}
    sd = {f"lora_unet_proj_out{s}": t for s, t in full.items() if s != missing}
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, {"proj_out.weight": (32, 144)}, name="cut.safetensors")
    assert str(e.value) == (f"cut.safetensors: lora_unet_proj_out (and 0 more) has no {named.pop()}, which its LoHa/LoKr "
                            "product needs: the file is damaged or cut short. Download or export it again.")
    # a layer with LoHa tensors beside a whole LoKr (ComfyUI's loader tries each adapter in turn): LoHa's needs count
    loha_cut = {s: t for s, t in {**full_of("loha"), **full_of("lokr")}.items() if s != ".hada_w2_b"}
    with pytest.raises(core_lora.LoraError, match="lora_unet_proj_out .and 0 more. has no .hada_w2_b,"):
        core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in loha_cut.items()}, {"proj_out.weight": (32, 144)})
    # one whole and one factored LoKr factor make a product (ComfyUI's lokr.py takes either form per factor)
    mixed = {".lokr_w1": r(4, 8), ".lokr_w2_a": r(8, 2), ".lokr_w2_b": r(2, 18)}
    plan = core_lora.prepare({f"lora_unet_proj_out{s}": t for s, t in mixed.items()}, {"proj_out.weight": (32, 144)})
    assert plan.dit_map == {"proj_out": "proj_out.weight"}


_TAIL = ("The LoRA was made for a PixArt of another size (or another model): use a LoRA trained on this checkpoint's "
         "architecture.")
# Files of layers that do not fit, and the whole refusal (no name given: "LoRA"). A fused qkv whose down weight has
# 100 columns for 144 is three misfits, its q, k and v parts, listed in that order, then a fourth past the first three.
_MISFITS = {
    "another_width": (
        {"blocks.0.attn.qkv.lora_up.weight": (432, 2), "blocks.0.attn.qkv.lora_down.weight": (2, 100),
         "lora_unet_proj_out.lora_up.weight": (32, 2), "lora_unet_proj_out.lora_down.weight": (2, 143)}, None,
        "LoRA: 4 layer(s) of this LoRA do not fit this model, e.g. "
        + "; ".join(f"blocks.0.attn.qkv makes a [144, 100] change for transformer_blocks.0.attn1.to_{c}.weight [144, 144]"
                    for c in "qkv") + ". " + _TAIL),
    # T5 layers have no bias: a bias difference for one has nothing to change
    "t5_bias": (
        {"lora_te_encoder_block_0_layer_0_SelfAttention_q.diff_b": (64,)}, "t5",
        "LoRA: 1 layer(s) of this LoRA do not fit this model, e.g. lora_te_encoder_block_0_layer_0_SelfAttention_q makes "
        "a [64] change for encoder.block.0.layer.0.SelfAttention.q.bias (none). " + _TAIL),
    # a DiT whose q, k, v have no bias: each part of a fused bias difference is a misfit
    "fused_bias": (
        {"blocks.0.attn.qkv.diff_b": (18,)}, "no_bias",
        "LoRA: 3 layer(s) of this LoRA do not fit this model, e.g. "
        + "; ".join(f"blocks.0.attn.qkv makes a [6] change for transformer_blocks.0.attn1.to_{c}.bias (none)" for c in "qkv")
        + ". " + _TAIL),
}


@pytest.mark.parametrize("case", list(_MISFITS))
def test_layers_that_do_not_fit_are_refused_saying_each_one(dit_model, case):
    """The refusal counts every part that does not fit (a fused layer's q, k and v each), shows the first three,
    says `(none)` for a bias the layer does not have, and calls a file given no name LoRA."""
    keys, other, message = _MISFITS[case]
    no_bias = {f"transformer_blocks.0.attn1.to_{c}.weight": (6, 4) for c in "qkv"}
    shapes = no_bias if other == "no_bias" else _shapes(dit_model)
    t5_shapes = _shapes(tiny.make_t5()) if other == "t5" else None
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare({k: torch.zeros(*s) for k, s in keys.items()}, shapes, t5_shapes)
    assert str(e.value) == message


@pytest.mark.filterwarnings(r"ignore:Adapter .default.. 1 LoRA tensor\(s\) have invalid shape")  # PEFT: the 1-D bias
def test_one_layer_with_a_tensor_no_adapter_reads_is_refused_saying_what_to_do(dit_model):
    """PEFT's lora_bias on a single layer: the refusal names that layer, the tensor, and what to do, whole."""
    from peft import LoraConfig

    sd, _, _ = peft_adapter(dit_model, LoraConfig(r=2, target_modules=["proj_out"], lora_bias=True, init_lora_weights=False))
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, _shapes(dit_model), name="bias.safetensors")
    assert str(e.value) == (
        "bias.safetensors: base_model.model.proj_out (and 0 more) has lora_B.bias beside the LoRA tensors; no weight "
        "adapter of ComfyUI reads it, and without it the change is wrong. Merge this adapter into the DiT (PEFT: "
        "merge_and_unload()) and load the merged checkpoint.")


def test_a_fused_layer_beside_a_lora_of_one_part_patches_the_other_parts():
    """A plain to_q LoRA before an original-layout qkv LoRA in the file: to_q keeps the first patch, and to_k and to_v
    still get their rows of the fused change (rows 6-11 and 12-17 of its up weight)."""
    shapes = {f"transformer_blocks.0.attn1.to_{c}.weight": (6, 4) for c in "qkv"}
    up, down, q_up, q_down = _rand(18, 1, seed=1), _rand(1, 4, seed=2), _rand(6, 1, seed=3), _rand(1, 4, seed=4)
    sd = {"lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": q_up,
          "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": q_down,
          "blocks.0.attn.qkv.lora_up.weight": up, "blocks.0.attn.qkv.lora_down.weight": down}
    plan = core_lora.prepare(sd, shapes)
    assert plan.dit_map == {f"transformer_blocks.0.attn1.to_{c}": f"transformer_blocks.0.attn1.to_{c}.weight" for c in "qkv"}
    assert torch.equal(plan.dit["transformer_blocks.0.attn1.to_q.lora_up.weight"], q_up)
    assert torch.equal(plan.dit["transformer_blocks.0.attn1.to_k.lora_up.weight"], up[6:12])
    assert torch.equal(plan.dit["transformer_blocks.0.attn1.to_v.lora_up.weight"], up[12:18])
    assert plan.unplaced == [f"blocks.0.attn.qkv.lora_{w}.weight: transformer_blocks.0.attn1.to_q.weight is already "
                             "patched by another key of this file" for w in ("down", "up")]


def test_another_models_lora_is_named_by_its_whole_keys():
    """A tensor name may hold any character (a safetensors name is any string): the example key in the refusal is
    the file's key whole, colon and all."""
    sd = {f"lora_unet_down_blocks_0:attentions_0_proj_in.lora_{w}.weight": torch.zeros(1) for w in ("up", "down")}
    with pytest.raises(core_lora.LoraError) as e:
        core_lora.prepare(sd, {"proj_out.weight": (2, 2)}, name="sd.safetensors")
    assert str(e.value) == (
        "sd.safetensors: this is a Stable Diffusion 1.x/2.x LoRA (UNet keys such as input_blocks / down_blocks), not a "
        "PixArt LoRA (e.g. lora_unet_down_blocks_0:attentions_0_proj_in.lora_down.weight). Use it with the model it was "
        "made for; PixArt-Σ/α needs a LoRA trained on PixArt.")

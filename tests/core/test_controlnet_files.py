"""PixArt ControlNet files (pixart_core, no ComfyUI): the authors' whole checkpoint, adapter files and folders load to
the same adapter weights key by key (the adapter state dicts come from diffusers' own modules, the original layout
from the authors' key names, harness.controlnet_files); every wrong file is a clear error naming it."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from harness import controlnet_files as cfiles
from harness import models as tiny
from pixart_core import controlnet as cn
from pixart_core import controlnet_files as cnf
from pixart_core.files import WeightFileError
from pixart_core.variants import PRESETS

LAYERS = 4


@pytest.fixture(scope="module")
def dit():
    return tiny.make_dit(layers=LAYERS, variant="alpha-1024")


@pytest.fixture(scope="module")
def adapter_sd(dit):
    return cfiles.adapter_state_dict(dit, 3, seed=1)


def _same(adapter, sd):
    got = adapter.state_dict()
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


@torch.no_grad()
def test_every_layout_loads_the_same_adapter(tmp_path, dit, adapter_sd):
    paths = {
        "authors": cfiles.write_authors_checkpoint(tmp_path / "PixArt-XL-2-1024-ControlNet.pth", dit, adapter_sd),
        "file": cfiles.write_adapter_file(tmp_path / "a.safetensors", adapter_sd),
        "prefixed": cfiles.write_adapter_file(tmp_path / "b.safetensors", adapter_sd, prefix="controlnet."),
        "folder": cfiles.write_adapter_folder(tmp_path / "research", adapter_sd),
        "simpletuner": cfiles.write_adapter_folder(tmp_path / "st" / "controlnet", adapter_sd, heads=2,
                                                   style="simpletuner").parent,
    }
    x = torch.randn(2, 4, 8, 8)
    hint = torch.randn(1, 4, 8, 8)
    kwargs = {"encoder_hidden_states": torch.randn(2, 3, dit.config.caption_channels),
              "timestep": torch.tensor([10, 10]),
              "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.ones(2, 1)}}
    # what the loader node shows the user for each layout
    layouts = {"authors": "the authors' checkpoint (original layout)", "file": "adapter layout",
               "prefixed": "adapter layout", "folder": "adapter folder", "simpletuner": "adapter folder"}
    outputs = {}
    for kind, path in paths.items():
        adapter, variant, layout = cnf.load_controlnet(path)
        _same(adapter, adapter_sd)
        assert variant == (PRESETS["alpha-1024"] if kind == "authors" else None)
        assert layout == layouts[kind], kind
        outputs[kind] = cn.controlled_forward(dit, [cn.Control(adapter, hint)], x, **kwargs)
    assert all(torch.equal(o, outputs["file"]) for o in outputs.values())


def test_authors_checkpoint_loads_in_the_dtype_asked(tmp_path, dit, adapter_sd):
    path = cfiles.write_authors_checkpoint(tmp_path / "PixArt-XL-2-1024-ControlNet.pth", dit, adapter_sd)
    adapter, _, _ = cnf.load_controlnet(path, torch.bfloat16)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    assert torch.equal(adapter.state_dict()["controlnet_blocks.2.after_proj.weight"],
                       adapter_sd["controlnet_blocks.2.after_proj.weight"].bfloat16())


@pytest.mark.parametrize("variant,tokens", [("alpha-1024", 120), ("alpha-512", 120), ("sigma-1024", 300),
                                            ("sigma-512", 300)])
def test_authors_checkpoint_tells_the_variant_of_its_base(tmp_path, variant, tokens):
    base = tiny.make_dit(layers=2, variant=variant)
    sd = cfiles.adapter_state_dict(base, 1)
    path = cfiles.write_authors_checkpoint(tmp_path / "c.pth", base, sd, caption_tokens=tokens)
    assert cnf.load_controlnet(path)[1] == PRESETS[variant]
    control_only = cfiles.write_authors_checkpoint(tmp_path / "d.pth", base, sd, with_base=False)
    assert cnf.load_controlnet(control_only)[1] is None  # no base part: nothing to tell


def test_variant_width_and_depth_mismatches_are_refused(tmp_path, dit, adapter_sd):
    path = cfiles.write_authors_checkpoint(tmp_path / "PixArt-XL-2-1024-ControlNet.pth", dit, adapter_sd)
    adapter, variant, _ = cnf.load_controlnet(path)
    cnf.check_base(adapter.config, dit.config, path.name, variant, PRESETS["alpha-1024"])  # the right base passes
    with pytest.raises(ValueError, match=r"PixArt-XL-2-1024-ControlNet.pth: .*trained with PixArt alpha-1024, "
                                         r"but the DiT is loaded as sigma-1024. Load the alpha-1024 DiT \(for the "
                                         r"authors' 1024 ControlNet: PixArt-XL-2-1024-MS.pth; for the 512 one: "
                                         r"PixArt-XL-2-512x512.pth\), or set the DiT loader's variant.$"):
        cnf.check_base(adapter.config, dit.config, path.name, variant, PRESETS["sigma-1024"])
    wide_sd = cfiles.adapter_state_dict(_three_head_dit(), 2)
    wide_path = cfiles.write_adapter_file(tmp_path / "wide.safetensors", wide_sd)
    wide_adapter = cnf.load_controlnet(wide_path)[0]
    with pytest.raises(ValueError, match=r"wide.safetensors: this ControlNet is 216 wide \(3 heads\), the DiT is 144 "
                                         r"wide \(2 heads\): it belongs to another PixArt model. Load the DiT it was "
                                         r"trained with \(PixArt XL/2 ControlNets are 1152 wide\).$"):
        cnf.check_base(wide_adapter.config, dit.config, wide_path.name)
    deep = cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "deep.safetensors",
                                                         cfiles.adapter_state_dict(dit, LAYERS)))[0]
    with pytest.raises(ValueError, match=r"deep.safetensors: this ControlNet has 4 control blocks; a DiT of 4 blocks "
                                         r"takes at most 3"):
        cnf.check_base(deep.config, dit.config, "deep.safetensors")


def _three_head_dit():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**{**tiny.dit_config(layers=LAYERS), "num_attention_heads": 3,
                                       "cross_attention_dim": 216})


def test_a_folder_gives_the_head_count_its_weights_cannot(tmp_path):
    """A 144-wide adapter of 4 heads of 36 (SimpleTuner's config.json says 4): its weights have the shapes of 2 heads
    of PixArt's 72, so the count must come from the config; it fits a 4-head DiT and is refused by a 2-head one."""
    from diffusers import PixArtTransformer2DModel

    four = PixArtTransformer2DModel(**{**tiny.dit_config(layers=LAYERS), "num_attention_heads": 4,
                                       "attention_head_dim": 36})
    folder = cfiles.write_adapter_folder(tmp_path / "st", cfiles.adapter_state_dict(four, 2), heads=4,
                                         style="simpletuner")
    adapter = cnf.load_controlnet(folder)[0]
    assert (adapter.config.heads, adapter.config.head_dim) == (4, 36)
    cnf.check_base(adapter.config, four.config, "st")
    with pytest.raises(ValueError, match=r"st: this ControlNet is 144 wide \(4 heads\), the DiT is 144 wide "
                                         r"\(2 heads\): it belongs to another PixArt model"):
        cnf.check_base(adapter.config, tiny.make_dit(layers=LAYERS).config, "st")


def test_load_logs_what_it_loaded_and_returns_a_frozen_adapter(tmp_path, dit, adapter_sd, caplog):
    caplog.set_level(logging.INFO, logger="pixart_sigma")
    authors = cfiles.write_authors_checkpoint(tmp_path / "PixArt-XL-2-1024-ControlNet.pth", dit, adapter_sd)
    adapter = cnf.load_controlnet(authors)[0]
    cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "a.safetensors", adapter_sd))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pixart_sigma")] == [
        "PixArt ControlNet PixArt-XL-2-1024-ControlNet.pth: the authors' checkpoint (original layout), 3 control "
        "blocks, 144 wide, trained with alpha-1024.",
        "PixArt ControlNet a.safetensors: adapter layout, 3 control blocks, 144 wide."]
    assert not adapter.training
    assert not any(p.requires_grad for p in adapter.parameters())


def test_authors_checkpoint_with_other_keys_loads_and_says_what_it_ignored(tmp_path, dit, adapter_sd, caplog):
    caplog.set_level(logging.WARNING, logger="pixart_sigma")
    ckpt = cfiles.authors_checkpoint(dit, adapter_sd)
    for name in ("ema.d", "ema.a", "step", "ema.b"):  # four keys outside controlnet.* / base_model.*
        ckpt["state_dict"][name] = torch.zeros(2)
    path = tmp_path / "with_ema.pth"
    torch.save(ckpt, str(path))
    adapter, variant, _ = cnf.load_controlnet(path)
    _same(adapter, adapter_sd)
    assert variant == PRESETS["alpha-1024"]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pixart_sigma")] == [
        "PixArt ControlNet with_ema.pth: ignoring 4 keys outside controlnet.* and base_model.* (e.g. ema.a, ema.b, "
        "ema.d)."]


def test_a_file_with_a_gap_in_its_blocks_is_named(tmp_path, adapter_sd):
    gap = {k: v for k, v in adapter_sd.items() if not k.startswith("controlnet_blocks.1.")}
    with pytest.raises(WeightFileError, match=r"gap.safetensors: the control blocks are numbered \[0, 2\], not 0..1; "
                                              r"the file is incomplete"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "gap.safetensors", gap))


def test_an_adapter_folder_with_bin_weights_loads(tmp_path, adapter_sd):
    folder = cfiles.write_adapter_folder(tmp_path / "bin", adapter_sd)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(adapter_sd, str(folder / "diffusion_pytorch_model.bin"))  # save_pretrained(safe_serialization=False)
    adapter, _, layout = cnf.load_controlnet(folder)
    _same(adapter, adapter_sd)
    assert layout == "adapter folder"


def test_folders_without_a_config_or_weights_are_refused(tmp_path, adapter_sd):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightFileError, match=r"empty: no config.json here or in controlnet/; not a PixArt ControlNet "
                                              r"adapter folder.$"):
        cnf.load_controlnet(empty)
    folder = cfiles.write_adapter_folder(tmp_path / "f", adapter_sd)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightFileError, match=r"f: no diffusion_pytorch_model.safetensors in this folder.$"):
        cnf.load_controlnet(folder)


def _base_shapes(dit, drop: tuple[str, ...], shapes: dict[str, tuple[int, ...]]):
    """The shapes of an authors' checkpoint's base_model.* (original layout, prefix stripped) of the α-1024 test DiT
    (micro-conditioned: csize_embedder.*; its 64x64 position table; α's 120-token null caption), changed."""
    width = dit.config.num_attention_heads * dit.config.attention_head_dim
    sd = tiny.dit_to_original(dit.state_dict(), pos_embed=torch.zeros(1, 64 * 64, width),
                              y_embedding=torch.zeros(120, dit.config.caption_channels))
    out = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith(drop)}
    return {**out, **shapes}


@pytest.mark.parametrize("drop,shapes,expected", [
    (("y_embedder.y_embedding", "pos_embed"), {}, "alpha-1024"),  # only α-1024-MS has the size embedders
    (("y_embedder.y_embedding",), {}, "alpha-1024"),  # the size embedders say α; the 64x64 table x patch 2 = 128
    (("y_embedder.y_embedding",), {"pos_embed": (1, 32 * 32, 144)}, "alpha-512"),  # the table says 512
    (("y_embedder.y_embedding", "csize_embedder."), {}, None),  # α or Σ: nothing tells
    (("x_embedder.proj.weight",), {}, "alpha-1024"),  # a table without the patch size: the size embedders
    ((), {"pos_embed": (1, 4000, 144)}, "alpha-1024"),  # no square table: the size embedders
    (("csize_embedder.",), {"y_embedder.y_embedding": (300, 64), "pos_embed": (1, 4 * 4, 144)}, None),  # Σ at 8
])
def test_base_variant_from_what_the_shapes_tell(dit, drop, shapes, expected):
    variant = cnf.base_variant(_base_shapes(dit, drop, shapes))
    assert (variant.name if variant else None) == expected


# --- hostile files ------------------------------------------------------------------------------------------------

def test_a_dit_without_control_blocks_is_refused(tmp_path, dit):
    original = tmp_path / "PixArt-XL-2-1024-MS.pth"
    torch.save({"state_dict": tiny.dit_to_original(dit.state_dict())}, str(original))
    with pytest.raises(WeightFileError, match=r"PixArt-XL-2-1024-MS.pth: this is not a PixArt ControlNet; it looks "
                                              r"like a PixArt transformer in the original key layout \(load it "
                                              r"with the PixArt DiT loader; a ControlNet goes beside it\). Choose a "
                                              r"PixArt ControlNet in models/controlnet"):
        cnf.load_controlnet(original)
    diffusers_file = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(diffusers_file))
    with pytest.raises(WeightFileError, match=r"dit.safetensors: this is not a PixArt ControlNet; it looks like a "
                                              r"PixArt transformer in the diffusers layout \(load it with the "
                                              r"PixArt DiT loader; a ControlNet goes beside it\). Choose a"):
        cnf.load_controlnet(diffusers_file)


@pytest.mark.parametrize("layout", [cfiles.unet_controlnet_state_dict, cfiles.ldm_unet_controlnet_state_dict],
                         ids=["diffusers", "original"])
@pytest.mark.parametrize("xl,words", [(False, "Stable Diffusion 1.x/2.x ControlNet"), (True, "Stable Diffusion XL ControlNet")])
def test_a_unet_controlnet_is_refused(tmp_path, layout, xl, words):
    """SD/SDXL ControlNets in diffusers' layout and in the original (lllyasviel's cldm.py) layout."""
    path = tmp_path / "control_canny.safetensors"
    save_file(layout(xl=xl), str(path))
    with pytest.raises(WeightFileError, match=rf"control_canny.safetensors: this is not a PixArt ControlNet; it looks "
                                              rf"like a {words} \(for a UNet\), which does not fit PixArt's "
                                              rf"transformer. Choose a PixArt ControlNet in models/controlnet"):
        cnf.load_controlnet(path)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_controlnet_of_another_transformer_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}_controlnet.safetensors"
    save_file(cfiles.transformer_controlnet_state_dict(kind), str(path))
    with pytest.raises(WeightFileError, match=rf"{kind}_controlnet.safetensors: this is not a PixArt ControlNet; it "
                                              r"looks like a ControlNet for another transformer \(SD3/Flux style: its "
                                              r"control blocks are single linears\). Choose a PixArt ControlNet"):
        cnf.load_controlnet(path)


def test_a_umt5_encoder_is_named_with_its_vocabulary(tmp_path):
    """The shapes reach the description: a umT5 encoder is told from T5 by its 256384-row embedding (transformers'
    T5 keys, the vocabulary of google/umt5-xxl's config)."""
    sd = tiny.t5_single_file_sd(tiny.make_t5(layers=1))
    sd["shared.weight"] = torch.zeros(256384, tiny.T5_WIDTH, dtype=torch.float16)
    words = r"a umT5 text encoder \(256384-token vocabulary; PixArt needs T5-v1.1-XXL with 32128 tokens\)"
    path = tmp_path / "umt5_xxl.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightFileError, match=rf"umt5_xxl.safetensors: this is not a PixArt ControlNet; it looks like "
                                              rf"{words}. Choose a PixArt ControlNet"):
        cnf.load_controlnet(path)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "PixArtControlNetAdapterModel", "num_layers": 1}')
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightFileError, match=rf"mixed: the weights are not a PixArt ControlNet adapter; they look "
                                              rf"like {words}. Choose a PixArt ControlNet in models/controlnet"):
        cnf.load_controlnet(folder)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_refused(tmp_path, dit, adapter_sd, suffix):
    path = tmp_path / f"PixArt-XL-2-1024-ControlNet{suffix}"
    if suffix == ".pth":
        cfiles.write_authors_checkpoint(path, dit, adapter_sd)
    else:
        cfiles.write_adapter_file(path, adapter_sd)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=rf"PixArt-XL-2-1024-ControlNet{suffix}: .*(truncated|corrupt)"):
        cnf.load_controlnet(path)


def test_unknown_missing_or_misshapen_control_keys_are_named(tmp_path, dit, adapter_sd):
    ckpt = cfiles.authors_checkpoint(dit, adapter_sd)
    ckpt["state_dict"]["controlnet.1.copied_block.attn.rel_pos_h"] = torch.zeros(3, 72)
    path = tmp_path / "extra.pth"
    torch.save(ckpt, str(path))
    with pytest.raises(WeightFileError, match=r"extra.pth: .*blocks.1.attn.rel_pos_h.*controlnet.N.copied_block"):
        cnf.load_controlnet(path)
    ckpt = cfiles.authors_checkpoint(dit, adapter_sd)
    for i in range(5):  # five: the message names the first four in order
        ckpt["state_dict"][f"controlnet.{i}.zero_conv.weight"] = torch.zeros(3)
    torch.save(ckpt, str(path))
    with pytest.raises(WeightFileError, match=r"extra.pth: 5 keys of this PixArt ControlNet checkpoint are not "
                                              r"control-block keys \(e.g. controlnet.0.zero_conv.weight, "
                                              r"controlnet.1.zero_conv.weight, controlnet.2.zero_conv.weight, "
                                              r"controlnet.3.zero_conv.weight\); it may be a ControlNet this loader "
                                              r"does not support yet.$"):
        cnf.load_controlnet(path)
    missing = {k: v for k, v in adapter_sd.items() if k != "controlnet_blocks.1.transformer_block.attn2.to_v.bias"}
    what = r"a PixArt ControlNet adapter \(3 blocks, 144 wide\)"  # the file's 3 blocks, 2 heads x 72
    with pytest.raises(WeightFileError, match=rf"missing.safetensors: the weights do not match {what}: 1 missing "
                                              r"\(e.g. controlnet_blocks.1."
                                              r"transformer_block.attn2.to_v.bias\)"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "missing.safetensors", missing))
    bad = dict(adapter_sd)
    bad["controlnet_blocks.2.transformer_block.ff.net.2.weight"] = torch.zeros(144, 100)
    with pytest.raises(WeightFileError, match=rf"bad.safetensors: 1 tensor shape\(s\) do not match {what}, e.g. "
                                              r"controlnet_blocks.2.transformer_block"
                                              r".ff.net.2.weight is \[144, 100\], expected \[144, 576\]"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "bad.safetensors", bad))


def test_a_file_with_integer_weights_is_refused(tmp_path, adapter_sd):
    """Integer tensors where the adapter's float weights go (a quantized file without its scales) are named, not cast
    to floats nor left to torch's own error."""
    ints = dict(adapter_sd)
    for key, dtype in (("controlnet_blocks.1.after_proj.weight", torch.uint8),
                       ("controlnet_blocks.0.after_proj.weight", torch.int8)):
        ints[key] = torch.zeros(adapter_sd[key].shape, dtype=dtype)  # the message's dtype is the named key's
    with pytest.raises(WeightFileError, match=r"int8.safetensors: 2 tensors are not floating point \(e.g. "
                                              r"controlnet_blocks.0.after_proj.weight is torch.int8\); quantized "
                                              r"ControlNets are not supported: use its fp32/fp16/bf16 file.$"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "int8.safetensors", ints))


def test_adapter_folders_that_disagree_with_their_config_are_refused(tmp_path, adapter_sd):
    folder = cfiles.write_adapter_folder(tmp_path / "f", adapter_sd)
    (folder / "config.json").write_text('{"_class_name": "PixArtControlNetAdapterModel", "num_layers": 13}')
    with pytest.raises(WeightFileError, match=r"config.json says 13 control blocks, the weights hold 3. The folder is "
                                              r"incomplete or mixed: download it again.$"):
        cnf.load_controlnet(folder)
    (folder / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(WeightFileError, match=r"config.json describes a ControlNetModel, not a PixArt ControlNet"):
        cnf.load_controlnet(folder)

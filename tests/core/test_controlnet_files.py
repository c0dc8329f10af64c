"""PixArt ControlNet files (pixart_core, no ComfyUI): the authors' whole checkpoint, adapter files and folders load to
the same adapter weights key by key (the adapter state dicts come from diffusers' own modules, the original layout
from the authors' key names, harness.controlnet_files); every wrong file is a clear error naming it."""
from __future__ import annotations

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
    outputs = {}
    for kind, path in paths.items():
        adapter, variant, _ = cnf.load_controlnet(path)
        _same(adapter, adapter_sd)
        assert variant == (PRESETS["alpha-1024"] if kind == "authors" else None)
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
                                         r"but the DiT is loaded as sigma-1024"):
        cnf.check_base(adapter.config, dit.config, path.name, variant, PRESETS["sigma-1024"])
    wide_sd = cfiles.adapter_state_dict(_three_head_dit(), 2)
    wide_path = cfiles.write_adapter_file(tmp_path / "wide.safetensors", wide_sd)
    wide_adapter = cnf.load_controlnet(wide_path)[0]
    with pytest.raises(ValueError, match=r"wide.safetensors: this ControlNet is 216 wide \(3 heads\), the DiT is 144 "
                                         r"wide \(2 heads\)"):
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


# --- hostile files ------------------------------------------------------------------------------------------------

def test_a_dit_without_control_blocks_is_refused(tmp_path, dit):
    original = tmp_path / "PixArt-XL-2-1024-MS.pth"
    torch.save({"state_dict": tiny.dit_to_original(dit.state_dict())}, str(original))
    with pytest.raises(WeightFileError, match=r"PixArt-XL-2-1024-MS.pth: this is not a PixArt ControlNet; it looks "
                                              r"like a PixArt transformer in the original key layout"):
        cnf.load_controlnet(original)
    diffusers_file = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(diffusers_file))
    with pytest.raises(WeightFileError, match=r"dit.safetensors: this is not a PixArt ControlNet; it looks like a "
                                              r"PixArt transformer in the diffusers layout"):
        cnf.load_controlnet(diffusers_file)


@pytest.mark.parametrize("xl,words", [(False, "Stable Diffusion 1.x/2.x ControlNet"), (True, "Stable Diffusion XL ControlNet")])
def test_a_unet_controlnet_is_refused(tmp_path, xl, words):
    path = tmp_path / "control_canny.safetensors"
    save_file(cfiles.unet_controlnet_state_dict(xl=xl), str(path))
    with pytest.raises(WeightFileError, match=rf"control_canny.safetensors: this is not a PixArt ControlNet; it looks "
                                              rf"like a {words} \(for a UNet\)"):
        cnf.load_controlnet(path)


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
    ckpt["state_dict"]["controlnet.0.zero_conv.weight"] = torch.zeros(3)
    torch.save(ckpt, str(path))
    with pytest.raises(WeightFileError, match=r"extra.pth: 1 keys .* not control-block keys \(e.g. controlnet.0.zero_conv"):
        cnf.load_controlnet(path)
    missing = {k: v for k, v in adapter_sd.items() if k != "controlnet_blocks.1.transformer_block.attn2.to_v.bias"}
    with pytest.raises(WeightFileError, match=r"missing.safetensors: .*1 missing \(e.g. controlnet_blocks.1."
                                              r"transformer_block.attn2.to_v.bias\)"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "missing.safetensors", missing))
    bad = dict(adapter_sd)
    bad["controlnet_blocks.2.transformer_block.ff.net.2.weight"] = torch.zeros(144, 100)
    with pytest.raises(WeightFileError, match=r"bad.safetensors: 1 tensor shape.*controlnet_blocks.2.transformer_block"
                                              r".ff.net.2.weight is \[144, 100\], expected \[144, 576\]"):
        cnf.load_controlnet(cfiles.write_adapter_file(tmp_path / "bad.safetensors", bad))


def test_adapter_folders_that_disagree_with_their_config_are_refused(tmp_path, adapter_sd):
    folder = cfiles.write_adapter_folder(tmp_path / "f", adapter_sd)
    (folder / "config.json").write_text('{"_class_name": "PixArtControlNetAdapterModel", "num_layers": 13}')
    with pytest.raises(WeightFileError, match=r"config.json says 13 control blocks, the weights hold 3"):
        cnf.load_controlnet(folder)
    (folder / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with pytest.raises(WeightFileError, match=r"config.json describes a ControlNetModel, not a PixArt ControlNet"):
        cnf.load_controlnet(folder)

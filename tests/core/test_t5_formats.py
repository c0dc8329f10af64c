"""The T5 files users already have beyond plain safetensors: ComfyUI's scaled fp8 and GGUF.

Expected values come from outside the pack: the unquantized transformers T5 the files were made from, gguf-py's
numpy dequantizer (`gguf.quants.dequantize`) and its tensor-name map (what llama.cpp's converter writes), and
ComfyUI's scaled-fp8 layout (comfy/ops.py scaled_fp8_ops, comfy/text_encoders/sd3_clip.py t5_xxl_detect).
"""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cases import cosine as _cos
from harness import gguf_files
from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda
from harness.gguf_files import GGUF_WIDTH_CONFIG
from harness.models import make_t5_from_config as _t5
from pixart_core import files
from pixart_core import gguf_t5
from pixart_core import t5 as ct5
from pixart_core import t5_spec

IDS = torch.tensor([[71, 1712, 3, 9, 1263, 16, 8, 4033, 6, 2054, 3, 1]])


@torch.no_grad()
def _hidden(model) -> torch.Tensor:
    return model(input_ids=IDS).last_hidden_state.float()


# ------------------------------------------------------------------------------------------------------ scaled fp8

@pytest.fixture(scope="module")
def scaled_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaled")
    model = _t5()
    save_file(tiny.t5_scaled_fp8_sd(model), str(tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    save_file(tiny.t5_scaled_fp8_sd(model, scales=False), str(tmp / "t5xxl_noscales.safetensors"))
    return tmp, _hidden(model)


# nf4's own error on this tiny T5 is ~0.01 (test_low_vram's nf4 floor is 0.97 for the same reason)
SCALED_MODES = [("none", torch.float32, 0.99), ("none", torch.bfloat16, 0.99),
                (t5_spec.QUANT_8BIT, torch.float32, 0.99), (t5_spec.QUANT_NF4, torch.float32, 0.97)]


@pytest.mark.parametrize("quant,dtype,floor", SCALED_MODES, ids=["fp32", "bf16", "8bit", "nf4"])
def test_scaled_fp8_t5_matches_the_fp32_original(scaled_setup, quant, dtype, floor):
    tmp, reference = scaled_setup
    loaded = ct5.load_t5(tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors", quant, dtype)
    assert _cos(_hidden(loaded.model), reference) >= floor
    bnb = {type(m).__name__ for m in loaded.model.modules()  # bitsandbytes layers, and ours built on them
           if any(c.__module__.startswith("bitsandbytes") for c in type(m).__mro__)}
    assert bnb == {"none": set(), t5_spec.QUANT_8BIT: {"Linear8bitLt"}, t5_spec.QUANT_NF4: {"Linear4bit"}}[quant]
    if quant == "none":
        assert all(p.dtype == dtype for p in loaded.model.parameters())


def test_scaled_fp8_scales_are_applied(scaled_setup):
    """Each weight equals fp8 value x its scale (ComfyUI's convert_weight), not the raw fp8 value."""
    from safetensors import safe_open

    tmp, _ = scaled_setup
    path = tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    model = ct5.load_t5(path, "none", torch.float32).model
    with safe_open(str(path), "pt") as f:
        key = "encoder.block.1.layer.1.DenseReluDense.wo"
        want = f.get_tensor(key + ".weight").float() * f.get_tensor(key + ".scale_weight")
        assert torch.equal(model.state_dict()[key + ".weight"], want)
        assert torch.equal(model.state_dict()["shared.weight"], f.get_tensor("shared.weight").float())


def test_scaled_fp8_without_its_scales_is_refused(scaled_setup):
    tmp, _ = scaled_setup
    with pytest.raises(files.WeightFileError, match=r"t5xxl_noscales.safetensors: a scaled fp8 file whose per-tensor "
                                                    r"scales are missing for 14 weight\(s\).*\.scale_weight"):
        ct5.load_t5(tmp / "t5xxl_noscales.safetensors", "none", torch.float32)


def test_scaled_fp8_with_a_prefix_and_no_scales_is_refused(tmp_path):
    """The same with ComfyUI's key prefix: its marker `<prefix>scaled_fp8` still says the weights need scales."""
    sd = tiny.t5_scaled_fp8_sd(tiny.make_t5(), scales=False)
    save_file({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(files.WeightFileError, match=r"t5.safetensors: a scaled fp8 file whose per-tensor "
                                                    r"scales are missing for 14 weight\(s\)"):
        ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32)


@pytest.mark.parametrize("bad", [0.0, float("nan"), -1.0])
def test_scaled_fp8_with_a_broken_scale_is_refused(tmp_path, bad):
    sd = tiny.t5_scaled_fp8_sd(tiny.make_t5())
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(bad)
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(files.WeightFileError, match=r"SelfAttention.q.scale_weight should be one positive finite"):
        ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32)


def test_scaled_fp8_with_a_prefix_and_input_scales(tmp_path):
    """ComfyUI-prefixed keys (text_encoders.t5xxl.transformer.) next to another encoder's (a combined file's
    clip_l, sorted before them) and scale_input tensors (fp8 matmul input scales, which do not change the weights)
    load too."""
    model = _t5()
    sd = tiny.t5_scaled_fp8_sd(model)
    sd.update({k[: -len("scale_weight")] + "scale_input": torch.tensor(1.0) for k in list(sd) if k.endswith("scale_weight")})
    prefix = "text_encoders.t5xxl.transformer."
    clip = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    save_file({**clip, **{prefix + k: v for k, v in sd.items()}}, str(tmp_path / "t5.safetensors"))
    assert _cos(_hidden(ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32).model), _hidden(model)) >= 0.99


# ------------------------------------------------------------------------------------------------- GGUF files
# (each type's dequantization against gguf-py, and llama.cpp's per-tensor mixes: tests/core/test_gguf_types.py)

# Cosine floors of the last hidden state vs the unquantized T5 (measured on this random T5: F32 1.0, F16 1.0,
# BF16 0.99999, Q8_0 0.99993, Q6_K 0.9991, Q5_K_M 0.9978, Q5_0 0.9969, Q4_K_M 0.9911, Q4_0 0.9887)
GGUF_FLOORS = {"F32": 0.99999, "F16": 0.9999, "BF16": 0.9999, "Q8_0": 0.999, "Q6_K": 0.997, "Q5_K_M": 0.99,
               "Q5_0": 0.99, "Q4_K_M": 0.975, "Q4_0": 0.97}


@pytest.fixture(scope="module")
def gguf_model():
    return _t5(GGUF_WIDTH_CONFIG)


@pytest.mark.parametrize("file_type", list(GGUF_FLOORS))
def test_gguf_t5_matches_the_unquantized_t5(tmp_path, gguf_model, file_type):
    import gguf

    path = gguf_files.write_t5_gguf(gguf_model, tmp_path / f"t5-v1_1-xxl-encoder-{file_type}.gguf", file_type)
    loaded = ct5.load_t5(path, "none", torch.float32)
    assert _cos(_hidden(loaded.model), _hidden(gguf_model)) >= GGUF_FLOORS[file_type]
    linears = [m for m in loaded.model.modules() if isinstance(m, gguf_t5.GGUFLinear)]
    assert len(linears) == 7 * GGUF_WIDTH_CONFIG["num_layers"]
    assert not any(type(m) is torch.nn.Linear for m in loaded.model.modules())
    # the file's types are kept in memory: each layer holds what the file holds
    reader = gguf.GGUFReader(str(path))
    by_name = {gguf_t5.hf_key(t.name): t for t in reader.tensors}
    for name, m in loaded.model.named_modules():
        if isinstance(m, gguf_t5.GGUFLinear):
            t = by_name[name + ".weight"]
            assert m.qtype == int(t.tensor_type) and m.qweight.numel() * m.qweight.element_size() == int(t.n_bytes)


@pytest.mark.parametrize("file_type", ["F32", "F16"])
def test_big_endian_gguf_t5_matches_the_unquantized_t5(tmp_path, gguf_model, file_type):
    """A big-endian GGUF (gguf-py's writer with GGUFEndian.BIG, as llama.cpp's converter writes for s390x): gguf-py
    reads its F32/F16 values in the file's byte order, and the T5 loads as from the little-endian file."""
    path = gguf_files.write_t5_gguf(gguf_model, tmp_path / f"t5-{file_type}-be.gguf", file_type, big_endian=True)
    loaded = ct5.load_t5(path, "none", torch.float32)
    assert _cos(_hidden(loaded.model), _hidden(gguf_model)) >= GGUF_FLOORS[file_type]


def test_a_gguf_load_says_what_the_file_holds_in_the_log(tmp_path, gguf_model, caplog):
    """The console names the file and counts its encoder tensors per GGUF type (counted here with gguf-py's reader
    over the same file, a llama.cpp Q4_K_M mix of four types; the decoder tensors of a whole T5 are not loaded, so
    not counted), after the warning that the width is not T5-XXL's 4096 (google/t5-v1_1-xxl config.json d_model)."""
    import gguf

    name = "t5-v1_1-xxl-encoder-Q4_K_M.gguf"
    path = gguf_files.write_t5_gguf(gguf_model, tmp_path / name, "Q4_K_M", recipe_layers=24,
                                    extra={"dec.blk.0.attn_q.weight": np.zeros((256, 256))})
    types = [t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if not t.name.startswith("dec.")]
    counts = ", ".join(f"{k} x{types.count(k)}" for k in sorted(set(types)))
    assert len(set(types)) == 4 and max(types.count(k) for k in types) > 1, counts
    with caplog.at_level(logging.INFO, logger="pixart_sigma"):
        ct5.load_t5(path, "none", torch.float32)
    assert [r.getMessage() for r in caplog.records] == [
        f"{name}: T5 width 256, not T5-v1.1-XXL's 4096: the DiT's caption projection must match it.",
        f"{name}: GGUF T5 ({counts}), linear weights kept quantized"]


def test_gguf_t5_memory_is_the_files(tmp_path, gguf_model):
    """A Q8_0 T5 holds its linear weights in ~8.5 bits per value, not 16 (bf16) or 32."""
    from pixart_core.quant import unique_bytes

    path = gguf_files.write_t5_gguf(gguf_model, tmp_path / "t5-Q8_0.gguf", "Q8_0")
    q8 = ct5.load_t5(path, "none", torch.bfloat16).model
    linear_values = sum(m.in_features * m.out_features for m in q8.modules() if isinstance(m, gguf_t5.GGUFLinear))
    linear_bytes = sum(m.qweight.numel() for m in q8.modules() if isinstance(m, gguf_t5.GGUFLinear))
    assert linear_bytes == linear_values // 32 * 34  # ggml block_q8_0: fp16 scale + 32 int8
    bf16 = ct5.load_t5(_save_fp16(gguf_model, tmp_path), "none", torch.bfloat16).model
    assert unique_bytes(q8) < unique_bytes(bf16) - linear_values * 2 + linear_bytes + 1


def _save_fp16(model, tmp_path):
    path = tmp_path / "t5_fp16.safetensors"
    save_file(tiny.t5_single_file_sd(model), str(path))
    return path


def test_gguf_t5_computes_in_the_chosen_dtype_and_moves(tmp_path):
    model = tiny.make_t5()
    path = gguf_files.write_t5_gguf(model, tmp_path / "t5-Q8_0.gguf", "Q8_0")
    loaded = ct5.load_t5(path, "none", torch.bfloat16)
    out = _hidden(loaded.model)
    assert loaded.model.shared.weight.dtype == torch.bfloat16 and _cos(out, _hidden(model)) >= 0.99
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    loaded.model.to("meta")  # every tensor (the quantized blocks too) is a parameter and moves with the model
    assert {t.device.type for t in [*loaded.model.parameters(), *loaded.model.buffers()]} == {"meta"}


def test_gguf_layer_computes_in_the_inputs_dtype(tmp_path):
    """A GGUF layer's output is the input times gguf-py's dequantized weight, in the input's dtype (bf16 here while
    the rest of the model was loaded in fp32)."""
    import gguf

    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-Q8_0.gguf", "Q8_0")
    layer = ct5.load_t5(path, "none", torch.float32).model.encoder.block[0].layer[1].DenseReluDense.wi_0
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "enc.blk.0.ffn_gate.weight")
    weight = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x, weight.to(torch.bfloat16)))


def test_gguf_layer_dequantizes_on_its_inputs_device(tmp_path):
    """ComfyUI streams a GGUF layer: its bytes stay in system memory and its input comes on the GPU. The layer
    dequantizes there (a fake CUDA GPU, harness.fake_cuda: its peak held the bytes' copy and the float32 weight)
    and gives what a plain torch Linear holding gguf-py's dequantized weight gives, on the GPU."""
    import gguf

    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-Q8_0.gguf", "Q8_0")
    layer = ct5.load_t5(path, "none", torch.float32).model.encoder.block[0].layer[1].DenseReluDense.wi_0
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "enc.blk.0.ffn_gate.weight")
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    plain.weight.data = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
    x = torch.randn(3, layer.in_features)
    with FakeCuda(1 << 30) as gpu, torch.no_grad():
        out = layer(x.to(CUDA))
        assert out.device == CUDA and gpu.holds(out) and not gpu.holds(layer.qweight)
    assert gpu.peak >= int(t.n_bytes) + plain.weight.numel() * 4
    assert torch.equal(out, plain(x).detach())


@pytest.mark.parametrize("decoder_first", [False, True], ids=["decoder last", "decoder first"])
def test_gguf_of_a_whole_t5_uses_its_encoder(tmp_path, decoder_first):
    """A GGUF of an encoder-decoder T5 (decoder tensors `dec.*`, after the encoder's or before them, as in the
    sorted order of the keys in transformers' safetensors files): the encoder loads, the decoder is left out."""
    model = tiny.make_t5()
    path = gguf_files.write_t5_gguf(model, tmp_path / "t5-Q8_0.gguf", "Q8_0",
                                    extra={"dec.blk.0.attn_q.weight": np.zeros((64, 64)), "dec.output_norm.weight":
                                           np.ones(64)}, extra_first=decoder_first)
    assert _cos(_hidden(ct5.load_t5(path, "none", torch.float32).model), _hidden(model)) >= 0.999


def test_gguf_key_names_are_llama_cpps():
    """Our map from GGUF names gives back the transformers names gguf-py's converter map was given."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 2)
    for key in tiny.make_t5().state_dict():
        if key != "encoder.embed_tokens.weight":
            assert gguf_t5.hf_key(names.get_name(key, try_suffixes=(".weight",))) == key


# ------------------------------------------------------------------------------------------------ GGUF hostile

# The GGUFs a user may put among text encoders by mistake. Language models by llama.cpp's names (gguf-py's
# MODEL_ARCH members): ComfyUI-GGUF's text encoders besides T5 (city96/ComfyUI-GGUF loader.py TXT_ARCH_LIST at
# 795e451, 2025-12-18: t5, t5encoder, llama, qwen2vl, qwen3, qwen3vl) and the chat models users hold most.
LANGUAGE_ARCHS = ["LLAMA", "QWEN2VL", "QWEN3", "QWEN3VL", "QWEN2", "GEMMA", "GEMMA2", "GEMMA3", "MISTRAL3"]
# ComfyUI-GGUF's image models (loader.py IMG_ARCH_LIST at 795e451), and the files its compatibility mode reads by
# tensor names (gguf_sd_loader: no general.architecture, as stable-diffusion.cpp writes, or "pig" / "cow")
IMAGE_ARCHS = ["flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
               "qwen_image"]
COMPAT_ARCHS = [None, "pig", "cow"]


@pytest.fixture(scope="module")
def t5_sd():
    return tiny.make_t5().state_dict()


def _refused_as(t5_sd, tmp_path, arch: str | bytes | int | None, holds: str, read_as: str | None = "arch") -> None:
    """The whole refusal of a GGUF whose general.architecture is `arch`, read as `read_as` ("arch": arch itself)."""
    path = gguf_files.write_t5_gguf(t5_sd, tmp_path / "model-Q8_0.gguf", "Q8_0", arch=arch)
    read_as = arch if read_as == "arch" else read_as
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(path, "none", torch.float32)
    assert str(e.value) == (
        f"model-Q8_0.gguf: this GGUF holds {holds} (general.architecture = {read_as!r}), not a T5 encoder. Choose a "
        "T5-v1.1-XXL GGUF (e.g. t5-v1_1-xxl-encoder-Q8_0.gguf from city96/t5-v1_1-xxl-encoder-gguf) or a T5 "
        "safetensors file.")


@pytest.mark.parametrize("member", LANGUAGE_ARCHS)
def test_gguf_of_a_language_model_is_named(t5_sd, tmp_path, member):
    import gguf

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[member]]
    _refused_as(t5_sd, tmp_path, arch, f"a {arch} language model")


@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_gguf_of_an_image_model_is_named(t5_sd, tmp_path, arch):
    _refused_as(t5_sd, tmp_path, arch, f"a {arch} diffusion model (load it with ComfyUI-GGUF's Unet Loader)")


@pytest.mark.parametrize("arch", COMPAT_ARCHS, ids=str)
def test_gguf_of_a_compatibility_mode_image_model_is_named(t5_sd, tmp_path, arch):
    _refused_as(t5_sd, tmp_path, arch,
                "a stable-diffusion.cpp/ComfyUI-GGUF image model (load it with ComfyUI-GGUF's Unet Loader)")


def test_gguf_of_another_architecture_is_named(t5_sd, tmp_path):
    """An architecture of neither kind (gguf-py MODEL_ARCH.MMPROJ, "clip": a vision projector) is named as it is."""
    import gguf

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]
    _refused_as(t5_sd, tmp_path, arch, f"a {arch!r} model")


def test_gguf_architecture_that_is_not_utf8_text_is_named(t5_sd, tmp_path):
    """A general.architecture string of bytes that are not UTF-8 is shown with U+FFFD (Python's "replace" error
    handler) for each bad byte; one that is no string (a uint32) is read as absent, as stable-diffusion.cpp's."""
    _refused_as(t5_sd, tmp_path, b"t5\xffenc\xc3", "a 't5\ufffdenc\ufffd' model", "t5\ufffdenc\ufffd")
    _refused_as(t5_sd, tmp_path, 5, "a stable-diffusion.cpp/ComfyUI-GGUF image model (load it with ComfyUI-GGUF's "
                "Unet Loader)", None)


def test_gguf_umt5_is_named(tmp_path):
    sd = dict(tiny.make_t5().state_dict())
    sd["shared.weight"] = torch.zeros(256384, tiny.T5_WIDTH)
    path = gguf_files.write_t5_gguf(sd, tmp_path / "umt5-xxl-encoder-Q8_0.gguf", "Q8_0")
    with pytest.raises(files.WeightFileError, match="umT5 encoder.*256384"):
        ct5.load_t5(path, "none", torch.float32)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_gguf_is_named(tmp_path, keep):
    """The whole message names the file and what gguf-py's reader raised on it."""
    import gguf

    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-Q8_0.gguf", "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(Exception) as raised:
        gguf.GGUFReader(str(path))
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(path, "none", torch.float32)
    assert str(e.value) == (
        f"t5-Q8_0.gguf: cannot read this GGUF file ({type(raised.value).__name__}: {raised.value}). It is truncated, "
        "corrupt or not a GGUF file: download it again (city96/t5-v1_1-xxl-encoder-gguf on Hugging Face).")


WO_1 = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
NORM_1 = "encoder.block.1.layer.1.layer_norm.weight"


@pytest.mark.parametrize("case", ["wrong shape", "missing"])
def test_gguf_with_wrong_tensors_is_named(t5_sd, tmp_path, case):
    """The whole message: the file, what does not match (the tiny T5's wo is d_model x d_ff, 64 x 128) and the
    model it should be."""
    sd = {k: v for k, v in t5_sd.items() if case != "missing" or k != NORM_1}
    path = gguf_files.write_t5_gguf(sd, tmp_path / "t5-Q8_0.gguf", "Q8_0",
                                    shapes={WO_1: (32, 128)} if case == "wrong shape" else None)
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(path, "none", torch.float32)
    assert str(e.value) == {
        "wrong shape": f"t5-Q8_0.gguf: 1 tensor shape(s) do not match a T5-v1.1 encoder, e.g. {WO_1} is [32, 128], "
                       "expected [64, 128].",
        "missing": f"t5-Q8_0.gguf: the weights do not match a T5-v1.1 encoder: 1 missing (e.g. {NORM_1}).",
    }[case]


def test_gguf_of_an_unread_type_is_named(tmp_path):
    import gguf

    path = tmp_path / "t5-Q8_1.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    w.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(path, "none", torch.float32)
    # the whole message; the types it lists are checked against ComfyUI-GGUF's in test_gguf_types.py
    assert re.fullmatch(
        r"t5-Q8_1\.gguf: tensor token_embd\.weight has GGUF type Q8_1, which this loader does not read \(it reads "
        r"(?:[A-Z0-9_]+, )+[A-Z0-9_]+\)\. Choose a file of one of those types, e\.g\. t5-v1_1-xxl-encoder-Q3_K_M\.gguf "
        r"\(city96/t5-v1_1-xxl-encoder-gguf\)\.", str(e.value)), str(e.value)


def test_bitsandbytes_quantization_of_a_gguf_is_refused(tmp_path):
    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-Q8_0.gguf", "Q8_0")
    for q in (t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4):
        with pytest.raises(ValueError, match="already quantized.*set quantization to 'none'"):
            ct5.load_t5(path, q, torch.float32)


@pytest.mark.parametrize("marker", ["encoder.block.1.layer.0.SelfAttention.q.scale_weight", "scaled_fp8"])
def test_each_scaled_fp8_marker_makes_fp8_weights_need_scales(tmp_path, marker):
    """Either sign of ComfyUI's scaled fp8 layout (a scale, or the marker) on fp8 weights: the missing scales are
    named (a plain fp8 file, with neither, loads: test_t5_precision)."""
    from safetensors.torch import save_file

    from pixart_core import files

    sd = tiny.t5_single_file_sd(tiny.make_t5(), dtype=torch.float8_e4m3fn)
    sd[marker] = torch.ones(())
    path = tmp_path / "t5xxl_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(files.WeightFileError, match=r"scales are missing for 1[34] weight\(s\) \(e.g. encoder.block.0"):
        ct5.load_t5(path, "none", torch.float32)


def test_scaled_fp8_t5_with_scales_missing_is_named(tmp_path):
    """fp8 weights with the scaled_fp8 marker but only one scale: the others' scales are missing (test_t5_formats
    loads complete scaled fp8 files)."""
    sd = tiny.t5_single_file_sd(tiny.make_t5(), dtype=torch.float8_e4m3fn)
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(())
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(files.WeightFileError, match=r"a scaled fp8 file whose per-tensor scales are missing for 13 "):
        ct5.load_t5(path, "none", torch.float32)


def test_one_missing_scale_is_named_in_the_whole_message(tmp_path):
    sd = tiny.t5_scaled_fp8_sd(tiny.make_t5())
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.scale_weight"]
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32)
    assert str(e.value) == (
        "t5.safetensors: a scaled fp8 file whose per-tensor scales are missing for 1 weight(s) (e.g. "
        "encoder.block.1.layer.1.DenseReluDense.wo.scale_weight); without them the weights are wrong by a factor per "
        "tensor. The file is incomplete or was converted badly: download t5xxl_fp8_e4m3fn_scaled.safetensors again, "
        "or use t5xxl_fp16.safetensors.")


def test_a_scale_of_several_numbers_is_shown_by_its_first_two(tmp_path):
    sd = tiny.t5_scaled_fp8_sd(tiny.make_t5())
    sd["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor([1.0, 2.0, 3.0])
    save_file(sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(files.WeightFileError) as e:
        ct5.load_t5(tmp_path / "t5.safetensors", "none", torch.float32)
    assert str(e.value) == (
        "t5.safetensors: encoder.block.0.layer.0.SelfAttention.q.scale_weight should be one positive finite number "
        "(a per-tensor scale) but is [3] [1.0, 2.0]. The file is corrupt: download it again.")


def test_a_scaled_fp8_load_says_so_in_the_log(scaled_setup, caplog):
    tmp, _ = scaled_setup
    with caplog.at_level(logging.INFO, logger="pixart_sigma"):
        ct5.load_t5(tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors", "none", torch.float32)
    assert "t5xxl_fp8_e4m3fn_scaled.safetensors: scaled fp8 T5 dequantized with its per-tensor scales" in [
        r.getMessage() for r in caplog.records]

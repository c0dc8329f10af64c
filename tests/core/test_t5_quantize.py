"""The per-tensor quantizer's edges (pixart_core.t5_quantize): the sources it leaves to transformers' loader and the
messages saying why, the key and shape checks, results that own their memory (not views of the source file), the
weights going to the device it is given, and the device memory it says it needs. References: transformers'
bitsandbytes load (which Linear layers become Linear8bitLt / Linear4bit, and the tensors bitsandbytes keeps for
them), the tiny T5's own weights and config (harness.models), and messages written out here."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, T5Config, T5EncoderModel

from harness import models as tiny
from harness.fake_cuda import CUDA, FakeCuda
from pixart_core import files, t5_quantize, t5_spec

CPU = torch.device("cpu")
Q8, NF4 = t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4
# A T5 whose Linear weights have odd sizes, none a multiple of 64 (wi_0: 97 x 33 = 3201 values): the rounding of
# nf4's packed bytes (two values a byte) and of its 64-value blocks shows.
ODD = dict(tiny.T5_CONFIG, d_model=33, d_ff=97, d_kv=8, num_heads=2, num_layers=1)


def _bnb(quant: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    if quant == Q8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=False)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """The tiny T5 (fp32) as a single file, and the model it was saved from."""
    model = tiny.make_t5()
    path = tmp_path_factory.mktemp("t5") / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(model, dtype=torch.float32), str(path))
    return path, model


def _write(path, sd):
    save_file(sd, str(path))
    return path


# -------------------------------------------------------------------------------------------------- refusals


def _pickle_folder(tmp_path):
    model = tiny.make_t5()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    return tmp_path / "bin"


def _pickle_file(tmp_path):
    torch.save(tiny.make_t5().state_dict(), tmp_path / "t5.bin")
    return tmp_path / "t5.bin"


def _scaled(tmp_path):
    return _write(tmp_path / "scaled.safetensors", tiny.t5_scaled_fp8_sd(tiny.make_t5()))


def _marker_only(tmp_path):
    """fp8 weights with ComfyUI's `scaled_fp8` marker but no scales: the marker alone says scaled fp8."""
    sd = tiny.t5_scaled_fp8_sd(tiny.make_t5(), scales=False)
    assert "scaled_fp8" in sd and not any(k.endswith(".scale_weight") for k in sd)
    return _write(tmp_path / "marker.safetensors", sd)


def _no_t5(tmp_path):
    return _write(tmp_path / "other.safetensors", {"proj.weight": torch.zeros(4, 4), "proj.bias": torch.zeros(4)})


@pytest.mark.parametrize("make, message", [
    (_pickle_folder, "bin is not a safetensors T5"),
    (_pickle_file, "t5.bin is not a safetensors T5"),
    (_scaled, "scaled.safetensors holds scaled fp8 weights"),
    (_marker_only, "marker.safetensors holds scaled fp8 weights"),
    (_no_t5, "other.safetensors: no T5 encoder keys"),
], ids=["pickle folder", "pickle file", "scaled fp8", "scaled fp8 marker", "no T5"])
def test_sources_left_to_transformers_loader_are_refused_saying_why(tmp_path, make, message):
    """The loader logs the refusal's message ("quantizing on the CPU (...)"): it names the file and the reason."""
    with pytest.raises(t5_quantize.UnsupportedSource) as e:
        t5_quantize.quantize_per_tensor(make(tmp_path), Q8, torch.float32, CPU)
    assert str(e.value) == message


def test_a_missing_tensor_is_named_with_the_file_and_the_model_it_should_be(tmp_path, tiny_file):
    sd = tiny.t5_single_file_sd(tiny_file[1], dtype=torch.float32)
    del sd["encoder.final_layer_norm.weight"]
    with pytest.raises(files.WeightFileError) as e:
        t5_quantize.quantize_per_tensor(_write(tmp_path / "t5.safetensors", sd), Q8, torch.float32, CPU)
    assert str(e.value) == ("t5.safetensors: the weights do not match a T5-v1.1 encoder: "
                            "1 missing (e.g. encoder.final_layer_norm.weight).")


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path, tiny_file):
    width = tiny.T5_CONFIG["d_model"]
    sd = tiny.t5_single_file_sd(tiny_file[1], dtype=torch.float32)
    sd["encoder.final_layer_norm.weight"] = torch.ones(width + 1)
    with pytest.raises(files.WeightFileError) as e:
        t5_quantize.quantize_per_tensor(_write(tmp_path / "t5.safetensors", sd), Q8, torch.float32, CPU)
    assert str(e.value) == f"t5.safetensors: encoder.final_layer_norm.weight is [{width + 1}], expected [{width}]."


def test_a_width_other_than_xxls_is_logged_with_the_files_name(tiny_file, caplog):
    """T5-v1.1-XXL is 4096 wide (google/t5-v1_1-xxl's config.json, d_model); the tiny T5 is not."""
    width = tiny.T5_CONFIG["d_model"]
    for run in (lambda: t5_quantize.device_bytes(tiny_file[0], Q8, torch.float32),
                lambda: t5_quantize.quantize_per_tensor(tiny_file[0], Q8, torch.float32, CPU)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run()
        assert any(r.getMessage().startswith(f"t5.safetensors: T5 width {width}, not T5-v1.1-XXL's 4096")
                   for r in caplog.records), [r.getMessage() for r in caplog.records]


# -------------------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
def test_unquantized_tensors_are_copies_not_views_of_the_source_file(tmp_path, quant):
    """safetensors' get_tensor gives a view of the file's memory map: a tensor kept in the source's dtype must be
    copied, or the result changes (or faults) when the file is rewritten. Here the source is fp32 and so is the
    result; the file is then overwritten in place with another T5's bytes of the same layout."""
    first, second = tiny.make_t5(seed=0), tiny.make_t5(seed=1)
    src = _write(tmp_path / "t5.safetensors", tiny.t5_single_file_sd(first, dtype=torch.float32))
    tensors, _ = t5_quantize.quantize_per_tensor(src, quant, torch.float32, CPU)
    other = _write(tmp_path / "other.safetensors", tiny.t5_single_file_sd(second, dtype=torch.float32)).read_bytes()
    assert len(other) == src.stat().st_size
    with open(src, "r+b") as f:
        f.write(other)
    want = first.state_dict()
    kept = [k for k, v in tensors.items() if v.dtype == torch.float32 and k in want]
    assert "shared.weight" in kept and "encoder.final_layer_norm.weight" in kept
    for k in kept:
        assert torch.equal(tensors[k], want[k]), k


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
def test_each_weight_is_quantized_on_the_device_it_is_given(tiny_file, quant):
    """On a fake CUDA GPU (harness.fake_cuda): the weights went there (its peak holds at least a 2-byte copy of the
    largest weight, d_ff x d_model values: float16 for 8-bit, the model's fp32 for nf4), and every result came back to the CPU, leaving nothing on it."""
    with FakeCuda(1 << 30) as gpu:
        tensors, _ = t5_quantize.quantize_per_tensor(tiny_file[0], quant, torch.float32, CUDA)
        assert all(not gpu.holds(t) for t in tensors.values())
        assert all(t.device == CPU for t in tensors.values())
    largest = tiny.T5_CONFIG["d_ff"] * tiny.T5_CONFIG["d_model"]
    assert gpu.peak >= largest * 2 and gpu.used == 0


@pytest.fixture(scope="module", params=[ODD, tiny.T5_CONFIG], ids=["odd sizes", "tiny"])
def odd_folder(tmp_path_factory, request):
    """A T5 folder: the odd sizes, and the tiny T5's even ones (wi_0: 128 x 64 = 8192 values)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("odd") / "t5"
    T5EncoderModel(T5Config(**request.param)).eval().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("quant", [Q8, NF4], ids=["8bit", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_device_bytes_are_what_bitsandbytes_holds_for_the_largest_quantized_weight(odd_folder, quant, dtype):
    """For each Linear transformers' load makes a Linear8bitLt / Linear4bit, what quantizing it holds at once: the
    copy that goes in (8-bit: float16, as Linear8bitLt quantizes it; nf4: the model's dtype) and the tensors
    bitsandbytes keeps for the layer (int8 matrix and fp32 row scales; packed nf4 values, fp32 block absmax and the
    fp32 code). The largest of them, in whole bytes."""
    import bitsandbytes as bnb

    model = T5EncoderModel.from_pretrained(odd_folder, dtype=dtype, quantization_config=_bnb(quant, dtype),
                                           device_map={"": "cpu"})
    held = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            n = m.weight.numel()
            held.append(n * torch.tensor([], dtype=torch.float16).element_size() + m.weight.data.nbytes
                        + m.weight.SCB.nbytes)
        elif isinstance(m, bnb.nn.Linear4bit):
            state = m.weight.quant_state
            n = math.prod(state.shape)
            held.append(n * torch.tensor([], dtype=dtype).element_size() + m.weight.data.nbytes + state.absmax.nbytes
                        + state.code.nbytes)
    assert len(held) > 1
    got = t5_quantize.device_bytes(odd_folder, quant, dtype)
    assert type(got) is int and got == max(held)

"""Every GGUF tensor type ComfyUI-GGUF reads, in GGUF T5 files that mix types per tensor as llama.cpp's quantizer
does (city96/t5-v1_1-xxl-encoder-gguf's Q3_K_S ... Q8_0), and a clear refusal of the types nobody reads.

Expected values come from outside the pack: gguf-py's numpy dequantizer (`gguf.quants.dequantize`), its type ids
and block sizes (`gguf.GGMLQuantizationType`, `gguf.GGML_QUANT_SIZES`), the unquantized transformers T5 the files
were made from, ComfyUI-GGUF's list of dequantized types (dequant.py `dequantize_functions`) and llama.cpp's
llama-quantize mixes (src/llama-quant.cpp `llama_tensor_get_type_impl`), written out by hand below.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cases import cosine
from harness import gguf_files
from harness import models as tiny
from pixart_core import files, gguf_quants, gguf_t5
from pixart_core import t5 as ct5

# city96/ComfyUI-GGUF dequant.py dequantize_functions (torch); F32/F16 are read as torch tensors
COMFYUI_GGUF_TYPES = ["BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K",
                      "IQ4_NL", "IQ4_XS"]
# Byte offsets of each block's fp16 scales (ggml-common.h: block_q4_1 {d, m, qs}, block_q2_K {scales, qs, d, dmin},
# block_q3_K {hmask, qs, scales, d}, ...): random blocks get finite scales there.
F16_OFFSETS = {"Q8_0": [0], "Q5_1": [0, 2], "Q5_0": [0], "Q4_1": [0, 2], "Q4_0": [0], "Q6_K": [208],
               "Q5_K": [0, 2], "Q4_K": [0, 2], "Q3_K": [108], "Q2_K": [80, 82], "IQ4_NL": [0], "IQ4_XS": [0]}


def test_readable_types_are_comfyui_ggufs():
    """The types read are ComfyUI-GGUF's, with gguf-py's type ids and block sizes."""
    import gguf

    assert gguf_quants.supported_types() == sorted(COMFYUI_GGUF_TYPES + ["F32", "F16"])
    for name in gguf_quants.supported_types():
        qtype = gguf.GGMLQuantizationType[name]
        kind = gguf_quants.TYPES[int(qtype)]
        assert (kind.name, kind.block, kind.size) == (name, *gguf.GGML_QUANT_SIZES[qtype])
    for name in ("IQ2_XXS", "IQ3_S", "IQ1_S", "TQ1_0", "TQ2_0", "Q8_1", "Q8_K", "MXFP4"):
        assert not gguf_quants.is_readable(int(gguf.GGMLQuantizationType[name]))


def _blocks(name: str, rng: np.random.Generator) -> np.ndarray:
    """Bytes of a [8, 512] weight quantized to `name` (all-zero and negative-only blocks among them), then 64
    random blocks (every bit pattern) with finite fp16 scales."""
    import gguf

    values = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    values[0, :256] = 0
    values[1, :256] = -np.abs(values[1, :256])
    data, _ = gguf_files.quantize(values, name)
    raw = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    if name == "BF16":
        return raw.copy()
    noise = rng.integers(0, 256, size=(64, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]), dtype=np.uint8)
    for off in F16_OFFSETS[name]:
        noise[:, off:off + 2] = (rng.standard_normal((64, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return np.concatenate([raw, noise.reshape(-1)])


@pytest.mark.parametrize("mode", ["whole", "chunked", "chunked-bf16"])
@pytest.mark.parametrize("name", COMFYUI_GGUF_TYPES)
def test_torch_dequantization_equals_gguf_reference(name, mode, monkeypatch):
    """Bit-exact with gguf-py's numpy values, on quantized weights (gguf-py's own quantizer where it has one, else
    harness.gguf_files') and on random blocks; whole, and a chunk at a time (as the load dequantizes the
    embedding) into float32 and into bfloat16 (gguf-py's float32 values rounded once)."""
    import gguf

    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 256)  # several chunks in this small tensor
    qtype = gguf.GGMLQuantizationType[name]
    raw = _blocks(name, np.random.default_rng(0))
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(-1, size), qtype).reshape(-1).copy())
    dtype = torch.bfloat16 if mode == "chunked-bf16" else torch.float32
    got = gguf_quants.dequantize(torch.from_numpy(raw), int(qtype), tuple(want.shape), dtype, chunked=mode != "whole")
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("name", COMFYUI_GGUF_TYPES)
def test_dequantization_stays_on_the_bytes_device(name, monkeypatch):
    """Every tensor the formulas make is on the bytes' device (the T5 dequantizes on the GPU its input is on): on
    torch's meta device, where a tensor made on the CPU instead raises, the block function gives float32
    [n, block] and dequantize the requested dtype and shape, whole and a chunk at a time (several chunks)."""
    import gguf

    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 256)  # 8 blocks of 32 values, or 1 of 256, a chunk
    qtype = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = torch.empty(12 * size, dtype=torch.uint8, device="meta")
    values = gguf_quants.TYPES[int(qtype)].blocks(raw.reshape(12, size))
    assert (values.device.type, values.dtype, tuple(values.shape)) == ("meta", torch.float32, (12, block))
    for chunked in (False, True):
        got = gguf_quants.dequantize(raw, int(qtype), (3, 4 * block), torch.bfloat16, chunked=chunked)
        assert (got.device.type, got.dtype, tuple(got.shape)) == ("meta", torch.bfloat16, (3, 4 * block))


class _BlockCalls:
    """Wraps a TYPES entry's block function (gguf_quants' own, run for real): the number of blocks of each call and
    the tensor each call returned."""

    def __init__(self, monkeypatch, qtype: int):
        kind = gguf_quants.TYPES[qtype]
        self.sizes, self.results = [], []

        def blocks(b: torch.Tensor) -> torch.Tensor:
            self.sizes.append(b.shape[0])
            self.results.append(kind.blocks(b))
            return self.results[-1]

        monkeypatch.setitem(gguf_quants.TYPES, qtype, kind._replace(blocks=blocks))


@pytest.mark.parametrize("case", ["default", "whole", "chunked", "one chunk", "under a block"])
def test_chunks_are_taken_only_when_asked_and_needed(case, monkeypatch):
    """Q8_0 (32 values, 34 bytes a block) with chunks of 40 blocks: by default and with chunked=False the whole
    tensor in one call; chunked, 100 blocks as 40 + 40 + 20 into one result, and 40 blocks (exactly one chunk) in
    one call whose float32 result is returned itself (no second buffer); a chunk smaller than a block (16 values)
    still takes one block at a time. The values are gguf-py's either way."""
    import gguf

    qtype = gguf.GGMLQuantizationType.Q8_0
    chunk, n, want_sizes = {"default": (40, 100, [100]), "whole": (40, 100, [100]),
                            "chunked": (40, 100, [40, 40, 20]), "one chunk": (40, 40, [40]),
                            "under a block": (0.5, 3, [1, 1, 1])}[case]
    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", int(chunk * 32))
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(n, 34), dtype=np.uint8)
    raw[:, :2] = (rng.standard_normal((n, 1)) * 0.01).astype(np.float16).view(np.uint8)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).copy())
    calls = _BlockCalls(monkeypatch, int(qtype))
    args = (torch.from_numpy(raw.reshape(-1)), int(qtype), (n, 32), torch.float32)
    got = gguf_quants.dequantize(*args) if case == "default" else \
        gguf_quants.dequantize(*args, chunked=case not in ("whole", "default"))
    assert calls.sizes == want_sizes
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if len(want_sizes) == 1:
        assert got.data_ptr() == calls.results[0].data_ptr()


def test_the_load_dequantizes_the_embedding_a_chunk_at_a_time(tmp_path, monkeypatch):
    """The token embedding (T5-XXL's: 32128 x 4096 values, 0.5 GB of float32 made whole) is dequantized at load a
    chunk at a time into the compute dtype, to gguf-py's values; the linear weights are not dequantized at load.
    A Q8_0 file of the tiny T5 (its other non-linear tensors F32/F16, no blocks), chunks of 1000 blocks."""
    import gguf

    qtype = gguf.GGMLQuantizationType.Q8_0
    monkeypatch.setattr(gguf_quants, "CHUNK_VALUES", 1000 * 32)
    path = gguf_files.write_t5_gguf(tiny.make_t5(), tmp_path / "t5-Q8_0.gguf", "Q8_0")
    embd = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    assert embd.tensor_type == qtype
    n = int(embd.n_bytes) // 34  # ggml block_q8_0: 34 bytes
    calls = _BlockCalls(monkeypatch, int(qtype))
    model = gguf_t5.load(path, torch.bfloat16)
    assert calls.sizes == [1000] * (n // 1000) + [n % 1000]
    want = torch.from_numpy(gguf.quants.dequantize(np.asarray(embd.data), qtype).copy())
    torch.testing.assert_close(model.shared.weight, want.to(torch.bfloat16), rtol=0, atol=0)


# Tolerances of harness.gguf_files' quantizers on N(0, 0.05) weights (max |error|): they write valid blocks
QUANTIZER_ERROR = {"BF16": 0.001, "Q8_0": 0.001, "Q6_K": 0.005, "Q5_K": 0.008, "Q5_1": 0.008, "Q5_0": 0.01,
                   "Q4_K": 0.015, "Q4_1": 0.015, "Q4_0": 0.02, "Q3_K": 0.05, "Q2_K": 0.07, "IQ4_NL": 0.02,
                   "IQ4_XS": 0.02}


@pytest.mark.parametrize("name", COMFYUI_GGUF_TYPES)
def test_test_quantizers_are_sane(name):
    """The file writer's blocks read back (by gguf-py) close to the weights they were made from."""
    import gguf

    values = (np.random.default_rng(1).standard_normal((8, 512)) * 0.05).astype(np.float32)
    data, qtype = gguf_files.quantize(values, name)
    back = gguf.quants.dequantize(np.ascontiguousarray(data).view(np.uint8), qtype)
    assert back.shape == values.shape and np.abs(back - values).max() < QUANTIZER_ERROR[name]


# ----------------------------------------------------------------------------------------- llama.cpp's mixes

# A T5 whose rows are whole K-quant blocks (256 values), with the first four blocks of a 24-block file's mix.
MIX_CONFIG = dict(gguf_files.GGUF_WIDTH_CONFIG, num_layers=4)
IDS = torch.tensor([[71, 1712, 3, 9, 1263, 16, 8, 4033, 6, 2054, 3, 1]])

# llama-quantize's choice for a T5 encoder of 24 blocks, blocks 0-3 (src/llama-quant.cpp llama_tensor_get_type_impl,
# by hand: one KV head per head, no experts, no importance matrix).
#   attn_v: Q2_K -> Q3_K; Q3_K_M -> Q5_K in the first two, then Q4_K; Q3_K_L -> Q5_K; Q4_K_S -> Q5_K in the first
#     four; Q4_K_M/Q5_K_M -> Q6_K where use_more_bits (blocks 0-2 of 24: i < 24/8).
#   ffn_down: Q2_K -> Q3_K; Q3_K_M -> Q5_K below 24/16, then Q4_K; Q3_K_L -> Q5_K; Q4_K_S and IQ4_XS/IQ4_NL -> Q5_K
#     below 24/8; Q4_K_M/Q5_K_M -> Q6_K where use_more_bits.
#   token_embd takes the output rule (a T5 encoder has no output.weight): Q6_K unless the file is Q8_0. attn_o is
#     not `attn_output`, so it keeps the file's type; norms F32; attn_rel_b is not quantized (F16 as converted).
# file type: (most linear weights, attn_v of blocks 0-3, ffn_down of blocks 0-3, token_embd)
MIXES = {
    "Q8_0": ("Q8_0", ["Q8_0"] * 4, ["Q8_0"] * 4, "Q8_0"),
    "Q6_K": ("Q6_K", ["Q6_K"] * 4, ["Q6_K"] * 4, "Q6_K"),
    "Q5_K_M": ("Q5_K", ["Q6_K"] * 3 + ["Q5_K"], ["Q6_K"] * 3 + ["Q5_K"], "Q6_K"),
    "Q5_K_S": ("Q5_K", ["Q5_K"] * 4, ["Q5_K"] * 4, "Q6_K"),
    "Q5_1": ("Q5_1", ["Q5_1"] * 4, ["Q5_1"] * 4, "Q6_K"),
    "Q4_K_M": ("Q4_K", ["Q6_K"] * 3 + ["Q4_K"], ["Q6_K"] * 3 + ["Q4_K"], "Q6_K"),
    "Q4_K_S": ("Q4_K", ["Q5_K"] * 4, ["Q5_K"] * 3 + ["Q4_K"], "Q6_K"),
    "Q4_1": ("Q4_1", ["Q4_1"] * 4, ["Q4_1"] * 4, "Q6_K"),
    "IQ4_XS": ("IQ4_XS", ["IQ4_XS"] * 4, ["Q5_K"] * 3 + ["IQ4_XS"], "Q6_K"),
    "IQ4_NL": ("IQ4_NL", ["IQ4_NL"] * 4, ["Q5_K"] * 3 + ["IQ4_NL"], "Q6_K"),
    "Q3_K_L": ("Q3_K", ["Q5_K"] * 4, ["Q5_K"] * 4, "Q6_K"),
    "Q3_K_M": ("Q3_K", ["Q5_K"] * 2 + ["Q4_K"] * 2, ["Q5_K"] + ["Q4_K"] * 3, "Q6_K"),
    "Q3_K_S": ("Q3_K", ["Q3_K"] * 4, ["Q3_K"] * 4, "Q6_K"),
    "Q2_K": ("Q2_K", ["Q3_K"] * 4, ["Q3_K"] * 4, "Q6_K"),
}
# Cosine of the last hidden state vs the unquantized T5, measured on this random 4-block T5 with seeds 0/1/2:
# Q8_0 0.99987-0.99988, Q6_K 0.9983-0.9985, Q5_K_M 0.9962-0.9969, Q5_K_S 0.9953-0.9960, Q5_1 0.9951-0.9957,
# Q4_K_M 0.9865-0.9867, Q4_K_S 0.9861-0.9866, Q4_1 0.9822-0.9836, IQ4_XS 0.9830-0.9832, IQ4_NL 0.9826-0.9836,
# Q3_K_L 0.953-0.957, Q3_K_M 0.951-0.956, Q3_K_S 0.931-0.935, Q2_K 0.80-0.82 (the test writer's plain min/max
# blocks, not llama.cpp's search). The floors leave about twice the loss.
MIX_FLOORS = {"Q8_0": 0.9995, "Q6_K": 0.996, "Q5_K_M": 0.992, "Q5_K_S": 0.99, "Q5_1": 0.99, "Q4_K_M": 0.97,
              "Q4_K_S": 0.97, "Q4_1": 0.965, "IQ4_XS": 0.965, "IQ4_NL": 0.965, "Q3_K_L": 0.9, "Q3_K_M": 0.9,
              "Q3_K_S": 0.86, "Q2_K": 0.6}


@torch.no_grad()
def _hidden(model) -> torch.Tensor:
    return model(input_ids=IDS).last_hidden_state.float()


@pytest.fixture(scope="module")
def mix_model():
    model = tiny.make_t5_from_config(MIX_CONFIG, seed=0)
    return model, _hidden(model)


def _expected_types(file_type: str) -> dict[str, str]:
    most, attn_v, ffn_down, embd = MIXES[file_type]
    out = {"token_embd.weight": embd, "enc.output_norm.weight": "F32", "enc.blk.0.attn_rel_b.weight": "F16"}
    for i in range(MIX_CONFIG["num_layers"]):
        out.update({f"enc.blk.{i}.{t}.weight": most for t in ("attn_q", "attn_k", "attn_o", "ffn_gate", "ffn_up")})
        out.update({f"enc.blk.{i}.attn_v.weight": attn_v[i], f"enc.blk.{i}.ffn_down.weight": ffn_down[i],
                    f"enc.blk.{i}.attn_norm.weight": "F32", f"enc.blk.{i}.ffn_norm.weight": "F32"})
    return out


@pytest.mark.parametrize("file_type", list(MIXES))
def test_mixed_gguf_t5_matches_the_unquantized_t5(tmp_path, mix_model, file_type):
    """A file mixing types per tensor as llama-quantize does loads, keeps each layer in its file type, and encodes
    close to the T5 it was made from."""
    import gguf

    model, reference = mix_model
    path = gguf_files.write_t5_gguf(model, tmp_path / f"t5-v1_1-xxl-encoder-{file_type}.gguf", file_type,
                                    recipe_layers=24)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert {name: t.tensor_type.name for name, t in tensors.items()} == _expected_types(file_type)
    loaded = ct5.load_t5(path, "none", torch.float32).model
    assert cosine(_hidden(loaded), reference) >= MIX_FLOORS[file_type]
    linears = {name: m for name, m in loaded.named_modules() if isinstance(m, gguf_t5.GGUFLinear)}
    assert len(linears) == 7 * MIX_CONFIG["num_layers"]
    by_key = {gguf_t5.hf_key(name): t for name, t in tensors.items()}
    for name, m in linears.items():
        t = by_key[name + ".weight"]
        assert m.qtype == int(t.tensor_type) and m.qweight.numel() == int(t.n_bytes)


# The sizes huggingface.co/city96/t5-v1_1-xxl-encoder-gguf lists (tree/main, GB = 1e9 bytes, as displayed)
CITY96_FILE_GB = {"Q3_K_S": 2.1, "Q3_K_M": 2.3, "Q3_K_L": 2.46, "Q4_K_S": 2.74, "Q4_K_M": 2.9, "Q5_K_S": 3.29,
                  "Q5_K_M": 3.39, "Q6_K": 3.91, "Q8_0": 5.06, "F16": 9.53}


@pytest.mark.parametrize("file_type", list(CITY96_FILE_GB))
def test_mixes_give_city96s_file_sizes(file_type):
    """The test files' per-tensor types, applied to T5-v1.1-XXL's 24 blocks, add up to city96's published file
    sizes (within the listing's rounding and the file's metadata: the tokenizer vocabulary is ~1 MB)."""
    file_bytes, _ = gguf_files.layout_bytes(tiny.t5_config("full"), file_type, 24, 2)
    assert abs(file_bytes / 1e9 - CITY96_FILE_GB[file_type]) < 0.006


# ------------------------------------------------------------------------------------------------ refused types

def _retyped(src, dest, tensor: str, qtype_name: str, data: np.ndarray):
    """A copy of the GGUF `src` with one tensor replaced by `data` (bytes of type `qtype_name`, same shape)."""
    import gguf

    writer = gguf.GGUFWriter(str(dest), "t5encoder")
    for t in gguf.GGUFReader(str(src)).tensors:
        if t.name == tensor:
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[qtype_name])
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return dest


@pytest.mark.parametrize("qtype_name", ["IQ2_XXS", "TQ2_0"])
def test_unread_type_is_refused_with_the_readable_ones(tmp_path, mix_model, qtype_name):
    """An IQ (grid) or ternary tensor: the error names the file, the tensor, its type and the types read."""
    import gguf

    q8 = gguf_files.write_t5_gguf(mix_model[0], tmp_path / "t5-Q8_0.gguf", "Q8_0")
    values = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32) * 0.05  # ffn_down, [out, in]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name == "TQ2_0":
        data = gguf.quants.quantize(values, qtype)  # gguf-py writes ternary blocks
    else:  # gguf-py cannot write IQ2_XXS: random bytes of the right size, read no further than the type
        data = np.random.default_rng(0).integers(0, 256, (256, 512 // 256 * gguf.GGML_QUANT_SIZES[qtype][1]),
                                                 dtype=np.uint8)
    path = _retyped(q8, tmp_path / f"t5-v1_1-xxl-encoder-{qtype_name}.gguf", "enc.blk.2.ffn_down.weight", qtype_name,
                    data)
    with pytest.raises(files.WeightFileError) as err:
        ct5.load_t5(path, "none", torch.float32)
    message = str(err.value)
    assert message.startswith(f"t5-v1_1-xxl-encoder-{qtype_name}.gguf: tensor enc.blk.2.ffn_down.weight has GGUF "
                              f"type {qtype_name}, which this loader does not read")
    readable = re.search(r"\(it reads ([A-Z0-9_, ]+)\)", message)
    assert readable and set(readable.group(1).split(", ")) == set(COMFYUI_GGUF_TYPES) | {"F32", "F16"}

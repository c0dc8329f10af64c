"""The T5's numbers in every storage and quantization mode: finite and faithful under weights that overflow fp16,
bitsandbytes' 8-bit side tensors following the module when it moves, and no per-forward cast notice."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from pixart_core import t5 as ct5
from pixart_core import t5_spec

LONG = "a lighthouse on a cliff above a stormy sea, waves crashing, dramatic clouds, " * 20  # > 300 tokens
CPU = torch.device("cpu")


def overflowing_t5():
    """A tiny T5 whose feed-forward outputs pass fp16's 65504 (as T5-XXL's wo outputs do)."""
    t5 = tiny.make_t5()
    with torch.no_grad():
        for block in t5.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wi_0.weight.mul_(8)
            ff.wi_1.weight.mul_(8)
            ff.wo.weight.mul_(800)
    return t5


@pytest.fixture(scope="module")
def overflow_setup(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("overflow")
    t5 = overflowing_t5()
    ids = tokenizer([ct5.preprocess(LONG)], padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = t5(**ids).last_hidden_state
        hidden = t5(**ids, output_hidden_states=True).hidden_states
        fp16 = tiny.make_t5()
        fp16.load_state_dict(t5.state_dict())
        plain_fp16 = fp16.half()(**ids).last_hidden_state.float()
    assert max(h.abs().max() for h in hidden) > 65504  # the residual stream really leaves fp16's range
    cos16 = torch.nn.functional.cosine_similarity(plain_fp16.flatten(), reference.flatten(), dim=0)
    assert not torch.isfinite(plain_fp16).all() or cos16 < 0.99  # plain fp16 compute breaks on these weights
    files = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
                        ("fp8_e4m3fn", torch.float8_e4m3fn)):
        files[name] = tmp / f"t5xxl_{name}.safetensors"
        save_file(tiny.t5_single_file_sd(t5, dtype=dtype), str(files[name]))
    files["fp8_scaled"] = tmp / "t5xxl_fp8_e4m3fn_scaled.safetensors"  # ComfyUI's scaled fp8 (harness.models)
    save_file(tiny.t5_scaled_fp8_sd(t5), str(files["fp8_scaled"]))
    return files, tokenizer, reference


MODES = [("none", torch.float32, 0.99), ("none", torch.bfloat16, 0.99),
         (t5_spec.QUANT_8BIT, torch.float32, 0.99), (t5_spec.QUANT_NF4, torch.float32, 0.97)]


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("quant,dtype,min_cos", MODES, ids=["fp32", "bf16", "8bit", "nf4"])
def test_t5_stays_finite_and_faithful_in_every_mode(overflow_setup, storage, quant, dtype, min_cos):
    files, tok, reference = overflow_setup
    loaded = ct5.load_t5(files[storage], quant, dtype)
    assert all(p.dtype != torch.float16 for n, p in loaded.model.named_parameters() if "wo" in n)
    emb, mask = ct5.encode(loaded, tok, LONG, 300, CPU)
    assert emb.dtype == torch.float32 and emb.shape == (1, 300, tiny.T5_WIDTH)
    assert torch.isfinite(emb).all()
    cos = torch.nn.functional.cosine_similarity(emb.flatten(), reference.flatten(), dim=0)
    floor = min_cos if not storage.startswith("fp8") or quant == "none" else min_cos - 0.01
    assert cos >= floor, f"{storage}/{quant}/{dtype}: cosine {cos:.4f}"


def test_int8_side_tensors_follow_the_module(tmp_path, tokenizer):
    import bitsandbytes as bnb

    from pixart_core.quant import all_tensors, int8_copies

    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    loaded = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
    before, _ = ct5.encode(loaded, tokenizer, "a red fox", 300, CPU)
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # After a forward the layers are back in bitsandbytes' before-the-first-forward form: the int8 matrix and its
    # scales on the weight (which Int8Params.to moves as one), nothing in .state that a .to() would copy again.
    assert layers and all(m.state.CB is None and m.state.SCB is None and m.weight.SCB is not None for m in layers)
    assert int8_copies(loaded.model) == [1] * len(layers)
    # What Linear8bitLt.to() leaves behind when .state holds the matrix: a second int8 copy (simulated with a
    # copy; this machine has one real device. test_gpu_readiness moves to a fake device, bench/gpu_check.py to CUDA.)
    for m in layers:
        m.weight.CB = m.weight.CB.clone()
    assert int8_copies(loaded.model) == [2] * len(layers)
    loaded.model.to(CPU)  # each 8-bit layer points its int8 matrix at the moved weight again
    assert all(t.device == CPU for _, t in all_tensors(loaded.model))
    assert int8_copies(loaded.model) == [1] * len(layers)  # one int8 copy, not two
    after, _ = ct5.encode(loaded, tokenizer, "a red fox", 300, CPU)
    assert torch.equal(before, after)


def test_int8_encode_prints_no_bitsandbytes_cast_notice(int8_t5, caplog):
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ...' once per layer per forward."""
    from pixart_core import t5 as ct5

    loaded, tok = int8_t5
    with caplog.at_level(logging.DEBUG):
        emb, _ = ct5.encode(loaded, tok, "a red fox in the snow", 300, CPU)
        # without our filter the same forward does log it (the notice is real, and on this logger)
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([[3, 4, 1]]))
    ours = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert torch.isfinite(emb).all()
    n_layers = sum(1 for m in loaded.model.modules() if type(m).__name__ == "Linear8bitLt")
    assert len(ours) == n_layers, f"{len(ours)} notices; expected only the unfiltered forward's {n_layers}"

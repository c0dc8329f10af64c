"""Low-VRAM behaviour: T5 dtype policy under fp16-overflowing weights, quantized T5 under model management,
the embedding cache, and moving 8-bit layers' side tensors."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from conftest import COMFY
from pixart_core import t5 as ct5
from pixart_core import t5_spec
from test_nodes import graph

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
def overflow_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overflow")
    t5 = overflowing_t5()
    tok = ct5.load_tokenizer([COMFY / "comfy" / "text_encoders" / "t5_tokenizer"])
    ids = tok([ct5.preprocess(LONG)], padding="max_length", max_length=300, truncation=True, return_tensors="pt")
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
    return files, tok, reference


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


def test_int8_side_tensors_follow_the_module(tmp_path):
    import bitsandbytes as bnb

    from pixart_core.quant import all_tensors, int8_copies

    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    loaded = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
    tok = ct5.load_tokenizer([COMFY / "comfy" / "text_encoders" / "t5_tokenizer"])
    before, _ = ct5.encode(loaded, tok, "a red fox", 300, CPU)
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
    after, _ = ct5.encode(loaded, tok, "a red fox", 300, CPU)
    assert torch.equal(before, after)


def _t5_loaded(comfy) -> int:
    import comfy.model_management as mm

    return sum(1 for m in mm.current_loaded_models
               if m.model is not None and type(getattr(m.model.model, "inner", None)).__name__ == "T5EncoderModel")


def test_embedding_cache_avoids_loading_t5_again(executor, comfy):
    import comfy.model_management as mm

    assert executor.run(graph(positive="a castle", seed=1))["ok"]
    assert executor.run(graph(positive="a boat", seed=1))["ok"]
    mm.unload_all_models()
    assert _t5_loaded(comfy) == 0
    again = executor.run(graph(positive="a castle", seed=1, steps=4))  # encode node runs; its prompts are cached
    assert again["ok"], again["error"]
    assert "2" not in next(d["nodes"] for e, d in again["messages"] if e == "execution_cached")
    assert _t5_loaded(comfy) == 0


@pytest.mark.parametrize("quant", ["8-bit (bitsandbytes)", "4-bit nf4 (bitsandbytes)"])  # the loader's labels
def test_quantized_t5_survives_offload_cycles_in_model_management(executor, comfy, quant):
    import comfy.model_management as mm

    from nodes_cache_helpers import clear_embeddings

    for i in range(3):
        clear_embeddings(comfy)
        result = executor.run(graph(quant=quant, positive=f"a tower number {i}", seed=i))
        assert result["ok"], result["error"]
        assert _t5_loaded(comfy) == 1  # one copy, loaded by model management
        mm.unload_all_models()  # offload everything, as ComfyUI does under memory pressure
        assert _t5_loaded(comfy) == 0

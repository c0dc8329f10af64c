"""A quantized T5 computing in fp32 (GPUs without bf16) with the layers bitsandbytes leaves unquantized stored in
bf16 (pixart_core.t5.store_unquantized): each feed-forward output layer `wo` (which transformers keeps out of
quantization, in the compute dtype) and the token embedding."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from pixart_core import t5 as ct5
from pixart_core import t5_spec
from pixart_core.quant import unique_bytes

# what the T5 Loader's other quantized modes reach against the unquantized fp32 T5 (tests/test_low_vram.py MODES)
FLOORS = {t5_spec.QUANT_8BIT: 0.99, t5_spec.QUANT_NF4: 0.97}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A tiny T5 whose feed-forward outputs pass fp16's 65504, as T5-XXL's `wo` outputs do, saved in fp32; its
    fp32 hidden state for 300 tokens."""
    t5 = tiny.make_t5()
    with torch.no_grad():
        for block in t5.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wi_0.weight.mul_(8)
            ff.wi_1.weight.mul_(8)
            ff.wo.weight.mul_(800)
    path = tmp_path_factory.mktemp("overflowing") / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(t5, dtype=torch.float32), str(path))
    ids = torch.randint(2, 32000, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = t5(input_ids=ids, output_hidden_states=True).hidden_states
    assert max(h.abs().max() for h in hidden) > 65504  # the residual stream leaves fp16's range
    return path, ids, hidden[-1]


def _encode(loaded, ids) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("mode", [t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4])
def test_unquantized_layers_in_bf16_halve_their_bytes_and_keep_the_encoding(overflowing, mode):
    path, ids, reference = overflowing
    wide = ct5.load_t5(path, mode, torch.float32)
    narrow = ct5.load_t5(path, mode, torch.float32, unquantized_dtype=torch.bfloat16)
    c = narrow.model.config
    # by hand: per block one wo (d_model x d_ff values), and the vocab_size x d_model embedding, 4 -> 2 bytes a value
    assert unique_bytes(wide.model) - unique_bytes(narrow.model) == 2 * (c.num_layers * c.d_model * c.d_ff
                                                                         + c.vocab_size * c.d_model)
    assert {b.layer[1].DenseReluDense.wo.weight.dtype for b in narrow.model.encoder.block} == {torch.bfloat16}
    assert narrow.model.shared.weight is narrow.model.encoder.embed_tokens.weight  # still one tied tensor
    assert narrow.model.shared.weight.dtype == torch.bfloat16
    kept_fp32 = {n for n, p in narrow.model.named_parameters() if p.dtype == torch.float32}
    assert kept_fp32 and all("layer_norm" in n or "relative_attention_bias" in n for n in kept_fp32)
    out, wide_out = _encode(narrow, ids), _encode(wide, ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _cos(out, reference) >= FLOORS[mode]
    # the bf16 storage costs next to nothing beside the quantization itself (measured 2026-12-07: 0.99989 8-bit,
    # 0.99997 nf4 between the two)
    assert _cos(out, wide_out) >= 0.9995


def test_the_cache_holds_transformers_bytes_whatever_the_storage(overflowing, tmp_path):
    """The bf16 storage is applied after the load, so a cache entry holds transformers' quantized model either way
    (its key and format need not change): a load that stores in bf16 and one that does not share the entry."""
    path, ids, _ = overflowing
    first = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32, cache_dir=tmp_path, unquantized_dtype=torch.bfloat16)
    assert first.cache.written
    again = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32, cache_dir=tmp_path)
    assert again.cache.hit and again.cache.entry == first.cache.entry
    plain = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
    assert {k: v.dtype for k, v in again.model.state_dict().items()} == \
           {k: v.dtype for k, v in plain.model.state_dict().items()}
    assert torch.equal(_encode(again, ids), _encode(plain, ids))

"""The size ComfyUI is told for a quantized T5 (pixart_core.quant.unique_bytes, the ModelPatcher's size) counts
bitsandbytes' tensors outside the parameters: 8-bit row scales (`SCB`), nf4 block maxima (`absmax`) and code
(`quant_map`), as bitsandbytes' own serialization (the state dict transformers saves) holds them."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import models as tiny
from pixart_core import t5 as ct5
from pixart_core import t5_spec
from pixart_core.quant import unique_bytes

# The tiny T5 (harness.models TINY: d_model 64, d_ff 128, 2 blocks): bitsandbytes quantizes q, k, v, o (64 x 64) and
# wi_0, wi_1 (128 x 64) in each block, 12 layers: 2 x (4 x 64 + 2 x 128) = 1024 rows and 2 x (4 x 4096 + 2 x 8192)
# = 65536 values. By hand: 8-bit keeps one fp32 scale per row (1024 x 4 bytes); nf4 one fp32 absmax per 64 values
# (1024 x 4 bytes) and a 16-value fp32 code per layer (12 x 64 bytes).
BY_HAND = {t5_spec.QUANT_8BIT: 1024 * 4, t5_spec.QUANT_NF4: 1024 * 4 + 12 * 16 * 4}
SIDE_KEYS = {t5_spec.QUANT_8BIT: (".SCB",), t5_spec.QUANT_NF4: (".absmax", ".quant_map")}


@pytest.mark.parametrize("mode", [t5_spec.QUANT_8BIT, t5_spec.QUANT_NF4])
def test_quantized_t5_size_counts_scales_and_block_maxima(tmp_path, mode):
    path = tmp_path / "t5.safetensors"
    save_file(tiny.t5_single_file_sd(tiny.make_t5()), str(path))
    model = ct5.load_t5(path, mode, torch.float32).model
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied embedding once
    serialized = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k.endswith(SIDE_KEYS[mode]))
    assert serialized == BY_HAND[mode]
    assert unique_bytes(model) == params + BY_HAND[mode]

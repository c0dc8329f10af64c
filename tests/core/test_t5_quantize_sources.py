"""The per-tensor quantizer (the GPU path of quantize-once) reads what the loader reads: here a full T5 (encoder and
decoder, as google/t5-v1_1-xxl's own checkpoint holds), whose decoder it leaves out as transformers'
T5EncoderModel does. Expected tensors: transformers' bitsandbytes load of the same folder, byte for byte."""
from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig, T5Config, T5EncoderModel, T5ForConditionalGeneration

from harness import models as tiny
from pixart_core import t5_quantize, t5_spec

CONFIGS = {t5_spec.QUANT_8BIT: BitsAndBytesConfig(load_in_8bit=True),
           t5_spec.QUANT_NF4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)}


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_a_full_encoder_decoder_t5_is_quantized_per_tensor_as_transformers_does(tmp_path, mode):
    encoder = tiny.make_t5()
    config = T5Config(**{**encoder.config.to_dict(), "is_encoder_decoder": True, "num_decoder_layers": 1,
                         "architectures": ["T5ForConditionalGeneration"]})
    full = T5ForConditionalGeneration(config)
    full.shared.load_state_dict(encoder.shared.state_dict())
    full.encoder.load_state_dict(encoder.encoder.state_dict())
    full.half().save_pretrained(tmp_path / "t5-v1_1", safe_serialization=True)
    assert any(k.startswith("decoder.") for k in full.state_dict())

    want = T5EncoderModel.from_pretrained(tmp_path / "t5-v1_1", dtype=torch.float32, quantization_config=CONFIGS[mode],
                                          device_map={"": "cpu"}).state_dict()
    want.pop("encoder.embed_tokens.weight")  # the tied embedding, stored once as shared.weight
    got, _ = t5_quantize.quantize_per_tensor(tmp_path / "t5-v1_1", mode, torch.float32, torch.device("cpu"))
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

"""What a quantized T5 from the T5 Loader takes on each card class, with ComfyUI's device queries answering as on
a machine with one CUDA GPU (a fake one: harness.fake_cuda) that has bf16 (Ampere and later) or not (Turing, Volta,
Pascal: `auto` computes the T5 in fp32 there), and on the CPU."""
from __future__ import annotations

import pytest
import torch

from harness.fake_cuda import CUDA, FakeCuda, comfy_sees

T5_FILE = "tiny_t5xxl_fp16.safetensors"  # harness.models.write_models: d_model 64, d_ff 128, 2 blocks, 4 heads
LABELS = {"8bit": "8-bit (bitsandbytes)", "nf4": "4-bit nf4 (bitsandbytes)"}


@pytest.fixture
def gpu_machine(comfy, monkeypatch, tmp_path):
    """A machine with one CUDA GPU whose bf16 support the test sets (ComfyUI's should_use_bf16 answering), and a T5
    cache folder of the test's own."""
    import comfy.model_management as mm
    import folder_paths

    monkeypatch.setattr(mm, "get_torch_device", lambda: CUDA)
    monkeypatch.setattr(mm, "text_encoder_device", lambda: CUDA)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "pixart_t5_cache", ([str(tmp_path / "cache")], set()))

    def card(bf16: bool) -> None:
        monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: bf16)
    return card


@pytest.mark.parametrize("mode", list(LABELS))
def test_a_quantized_t5_takes_the_same_vram_with_or_without_bf16(comfy, gpu_machine, mode):
    """Without bf16 the T5 computes in fp32, and transformers keeps every `wo` unquantized in fp32 beside an fp32
    embedding (T5-XXL: 8-bit 7.6 GiB, nf4 6.1 GiB instead of 5.5 / 4.0; bench/RESULTS.md). The T5 Loader stores
    them in bf16 on a GPU: the model is the bf16 card's, but for its norms and relative attention bias in fp32. On
    the CPU they stay as transformers loads them."""
    loader = comfy.NODE_CLASS_MAPPINGS["PixArtSigmaT5Loader"]
    handles = {}
    with comfy_sees(FakeCuda(1 << 30)):
        for card, bf16 in (("ampere", True), ("turing", False)):
            gpu_machine(bf16)
            handles[card] = loader.execute(t5_name=T5_FILE, quantization=LABELS[mode], dtype="auto").result[0]
        handles["cpu"] = loader.execute(t5_name=T5_FILE, quantization=LABELS[mode], dtype="auto",
                                        device="cpu").result[0]
    ampere, turing, cpu = (handles[k] for k in ("ampere", "turing", "cpu"))
    assert (ampere.dtype, turing.dtype, cpu.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    c = turing.patcher.model.inner.config
    # by hand: fp32 norms (2 per block + the final one, d_model values each) and the 32 x heads relative attention
    # bias take 2 bytes a value more than in bf16
    norms_and_bias = 2 * ((2 * c.num_layers + 1) * c.d_model + c.relative_attention_num_buckets * c.num_heads)
    assert turing.patcher.model_size() <= ampere.patcher.model_size() + norms_and_bias
    # the CPU T5 keeps each wo (d_model x d_ff) and the vocab_size x d_model embedding in fp32: 2 bytes a value more
    kept = 2 * (c.num_layers * c.d_model * c.d_ff + c.vocab_size * c.d_model)
    assert cpu.patcher.model_size() == turing.patcher.model_size() + kept

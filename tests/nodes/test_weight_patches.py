"""Weight adapters as ModelPatcher patches (nodes/comfy/patches.with_weight_patches): which modules ComfyUI's LoRA
code (comfy.lora.load_lora and its weight adapters, 0.3.75) reads, and the ones it cannot, reported by the pack
once, without ComfyUI's own "lora key not loaded" warnings beside them."""
from __future__ import annotations

import logging

import torch

from harness.comfyui import pack

CPU = torch.device("cpu")


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)


def test_unread_modules_are_the_ones_no_comfyui_adapter_reads(comfy, caplog):
    patches, loading = pack("nodes.comfy.patches"), pack("nodes.comfy.loading")
    patcher = loading.wrap(Two(), CPU, CPU)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "lora_a.lora_up.weight": torch.randn(6, 2, generator=g),  # a LoRA: ComfyUI's LoRA adapter reads it
        "lora_a.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_b.diff_b": torch.randn(6, generator=g),  # a bias difference alone: load_lora patches b.bias
        "lora_c.scale_table": torch.randn(6, generator=g),  # a tensor no adapter reads
    }
    key_map = {"lora_a": "a.weight", "lora_b": "b.weight", "lora_c": "c.weight"}
    caplog.set_level(logging.INFO)
    clone, n, unread = patches.with_weight_patches(patcher, tensors, key_map, 0.5)
    assert (n, unread) == (2, ["lora_c"])
    assert set(clone.patches) == {"inner.a.weight", "inner.b.bias"} and not patcher.patches
    assert [e[0] for v in clone.patches.values() for e in v] == [0.5, 0.5]  # the strength
    assert "lora key not loaded" not in caplog.text

"""Refusals a node makes before it touches a model, checked as whole messages (what was wrong and what to do): the
nodes' execute() called as ComfyUI's executor calls it, with the inputs that are wrong."""
from __future__ import annotations

import pytest
import torch


def _node(comfy, node_id):
    return comfy.NODE_CLASS_MAPPINGS[node_id]


def test_controlnet_apply_with_start_after_end(comfy):
    with pytest.raises(ValueError) as e:
        _node(comfy, "PixArtSigmaControlNetApply").execute(dit=None, controlnet=None, image=None, vae=None,
                                                           strength=1.0, start_percent=0.6, end_percent=0.4)
    assert str(e.value) == ("PixArt ControlNet Apply: start_percent 0.6 is after end_percent 0.4; the ControlNet acts "
                            "from start to end of the schedule.")


def test_hires_upscale_through_the_vae_without_a_vae(comfy):
    with pytest.raises(ValueError) as e:
        _node(comfy, "PixArtSigmaHiresUpscale").execute(samples={"samples": torch.zeros(1, 4, 8, 8)}, family="2048",
                                                        method="vae (decode, upscale, encode)",
                                                        upscale_mode="bicubic", width=128, height=128, vae=None)
    assert str(e.value) == ("PixArt hires upscale: method 'vae' needs a VAE; connect PixArt-Σ VAE Loader or choose "
                            "method 'latent'.")


def test_text_encode_without_a_t5(comfy):
    """What a LoRA loader's t5 output carries when its t5 input is not connected: None."""
    with pytest.raises(ValueError) as e:
        _node(comfy, "PixArtSigmaTextEncode").execute(t5=None, positive="a fox", negative="", max_tokens=300,
                                                      caption_cleaning="diffusers")
    assert str(e.value) == ("PixArt Text Encode got no T5: the t5 output of PixArt-Σ LoRA Loader carries a T5 only when "
                            "its t5 input is connected. Connect PixArt-Σ T5 Loader to the LoRA loader's t5 input, or "
                            "wire the T5 Loader straight into Text Encode.")

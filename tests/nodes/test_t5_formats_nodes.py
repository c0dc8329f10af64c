"""The T5 file kinds beyond plain safetensors (ComfyUI's scaled fp8, GGUF) in the real ComfyUI: the loader lists them
from text_encoders/ and clip/, and a whole graph runs with each, its conditioning close to the fp16 file's."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cases import cosine as _cos
from harness import gguf_files
from harness import models as tiny


@pytest.fixture(scope="module")
def format_files(comfy_base):
    te, clip = comfy_base / "models" / "text_encoders", comfy_base / "models" / "clip"
    clip.mkdir(parents=True, exist_ok=True)
    model = tiny.make_t5()  # the tiny DiT's 64-wide captions; Q8_0/Q4_0 blocks are 32 wide
    save_file(tiny.t5_scaled_fp8_sd(model), str(te / "tiny_t5xxl_fp8_e4m3fn_scaled.safetensors"))
    gguf_files.write_t5_gguf(model, te / "tiny-t5-v1_1-xxl-encoder-Q8_0.gguf", "Q8_0")
    gguf_files.write_t5_gguf(model, clip / "tiny-t5-v1_1-xxl-encoder-Q4_0.gguf", "Q4_0")
    return model


def test_loader_lists_gguf_files_from_text_encoders_and_clip(comfy, format_files):
    """ComfyUI's text_encoders list covers models/text_encoders and models/clip; its own file lists skip .gguf."""
    import folder_paths
    import nodes

    from harness.comfyui import node_info
    from harness.workflow import combo_options

    choices = combo_options(node_info(nodes, "PixArtSigmaT5Loader")["input"]["required"]["t5_name"])
    assert {"tiny-t5-v1_1-xxl-encoder-Q8_0.gguf", "tiny-t5-v1_1-xxl-encoder-Q4_0.gguf",
            "tiny_t5xxl_fp8_e4m3fn_scaled.safetensors", "tiny_t5xxl_fp16.safetensors"} <= set(choices)
    assert "tiny-t5-v1_1-xxl-encoder-Q4_0.gguf" not in folder_paths.get_filename_list("text_encoders")


def _embeds(t5_file: str, text: str) -> torch.Tensor:
    """The positive embeddings Text Encode made from this T5 file, as the pack's embedding cache holds them."""
    import sys

    mods = [m for n, m in sys.modules.items() if n.endswith("pixart_sigma_nodes.nodes.text")]
    hits = [cond.embeds for m in mods for key, cond in list(m.EMBEDDINGS._items.items())
            if key[0][0].endswith("/" + t5_file) and key[1] == text]
    assert hits, f"no embeddings of {t5_file}"
    return hits[-1]


@pytest.mark.parametrize("name,floor", [("tiny_t5xxl_fp8_e4m3fn_scaled.safetensors", 0.99),
                                        ("tiny-t5-v1_1-xxl-encoder-Q8_0.gguf", 0.999),
                                        ("tiny-t5-v1_1-xxl-encoder-Q4_0.gguf", 0.97)])
def test_each_t5_file_kind_runs_in_comfyui(executor, comfy, comfy_base, format_files, name, floor):
    """Through ComfyUI's executor: a whole graph runs with each file kind, its conditioning matches the fp16 file's
    (same weights) up to the format's rounding, and model management holds the T5 as loaded (GGUF layers kept)."""
    import comfy.model_management as mm

    from harness.graphs import graph

    # A prompt no other test encodes: ComfyUI's executor then runs Text Encode for both files (it would serve an
    # earlier identical node from its own cache), so the pack's embedding cache holds both encodings now.
    text = "a red fox in the snow seen by the " + {0.99: "scaled", 0.999: "eight", 0.97: "four"}[floor] + " encoder"
    for t5 in ("tiny_t5xxl_fp16.safetensors", name):
        result = executor.run(graph(t5=t5, seed=4242, prefix="formats", positive=text))
        assert result["ok"], result["error"]
    assert _cos(_embeds(name, text), _embeds("tiny_t5xxl_fp16.safetensors", text)) >= floor
    held = [m.model.model.inner for m in mm.current_loaded_models
            if m.model is not None and type(getattr(m.model.model, "inner", None)).__name__ == "T5EncoderModel"]
    if name.endswith(".gguf"):
        assert any(type(m).__name__ == "GGUFLinear" for t5 in held for m in t5.modules())

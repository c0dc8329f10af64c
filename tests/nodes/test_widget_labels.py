"""The nodes' widget labels, which saved workflows hold, against what they do.

The T5 nodes: every T5 Loader and Text Encode widget value saved in example_workflows/*.json, and a T5 Loader saved
before its `device` widget (three values), converts as the frontend converts it, passes ComfyUI's validation, runs,
and loads or cleans as its label says. The samplers: every scheduler label saved or ever offered maps to a core
scheduler id and back to the same label.

Expected values come from outside the pack: the labels as the example workflows saved them, bitsandbytes' layer
classes, diffusers' PixArtSigmaPipeline text preprocessing, the original PixArt-Σ script (strip only) and
transformers' T5EncoderModel on the same folder.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import COMFY, EXAMPLES, REPO
from harness import comfyui
from harness.comfyui import pack
from harness.workflow import ui_to_api

T5_FILE = "tiny_t5xxl_fp16.safetensors"
PIPE = "tiny-PixArt-Sigma-XL-2-1024-MS"
LOADER, ENCODE = "PixArtSigmaT5Loader", "PixArtSigmaTextEncode"
# The options as saved workflows hold them (example_workflows/*.json, and every workflow users saved), in order.
QUANTIZATION_OPTIONS = ["none", "8-bit (bitsandbytes)", "4-bit nf4 (bitsandbytes)"]
CLEANING_OPTIONS = ["diffusers", "lowercase", "none"]
# What each quantization label loads: bitsandbytes' layer class for the T5's Linear layers (and its 4-bit type).
LAYERS = {"none": (None, None), "8-bit (bitsandbytes)": ("Linear8bitLt", None),
          "4-bit nf4 (bitsandbytes)": ("Linear4bit", "nf4")}
HOSTILE = "  Visit https://example.com/fox for A <b>Red</b> Fox in the SNOW #12  "
# The scheduler widget's options as every workflow saved before the core got its own scheduler ids holds them.
SAVED_SCHEDULER_LABELS = ["dpm++ 2m", "sa-solver", "ddim", "euler", "euler ancestral", "unipc", "ddpm", "lcm",
                          "dmd 1-step (t=400)"]


def _node(comfy, node_id):
    return comfy.NODE_CLASS_MAPPINGS[node_id]


def _saved_inputs(comfy) -> list[tuple[str, dict, dict]]:
    """(example, T5 Loader inputs, Text Encode inputs) of every example workflow as the frontend converts them, and
    of each one with its T5 Loader saved before `device` existed (its first three widget values)."""
    out = []
    for name in EXAMPLES:
        wf = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        info = comfyui.object_info(comfy, {n["type"] for n in wf["nodes"]})
        for old in (False, True):
            if old:
                for n in wf["nodes"]:
                    if n["type"] == LOADER:
                        n["widgets_values"] = n["widgets_values"][:3]
            prompt = ui_to_api(wf, info)
            loader = next(n["inputs"] for n in prompt.values() if n["class_type"] == LOADER)
            encode = next(n["inputs"] for n in prompt.values() if n["class_type"] == ENCODE)
            out.append((name + (" (saved before device)" if old else ""), loader, encode))
    return out


def test_t5_widgets_keep_the_saved_options_and_defaults(comfy):
    info = comfyui.object_info(comfy, {LOADER, ENCODE})
    kind, opts = info[LOADER]["input"]["required"]["quantization"]
    assert kind == "COMBO" and opts["options"] == QUANTIZATION_OPTIONS and opts["default"] == "none"
    kind, opts = info[ENCODE]["input"]["optional"]["caption_cleaning"]
    assert kind == "COMBO" and opts["options"] == CLEANING_OPTIONS and opts["default"] == "diffusers"
    assert info[LOADER]["input_order"] == {"required": ["t5_name", "quantization", "dtype"], "optional": ["device"]}
    assert info[ENCODE]["input_order"] == {"required": ["t5", "positive", "negative", "max_tokens"],
                                           "optional": ["caption_cleaning"]}


def test_every_saved_t5_widget_value_runs_and_loads_what_its_label_says(comfy, executor):
    saved = _saved_inputs(comfy)
    quantizations = {loader["quantization"] for _, loader, _ in saved}
    assert quantizations == set(QUANTIZATION_OPTIONS), quantizations  # the examples hold every label
    assert any("device" not in loader for _, loader, _ in saved)
    for name, loader, encode in saved:
        loader = {**loader, "t5_name": T5_FILE}  # the tiny stand-in under the saved settings
        prompt = {"1": {"class_type": LOADER, "inputs": loader},
                  "2": {"class_type": ENCODE, "inputs": {**encode, "t5": ["1", 0]}},
                  "3": {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 0]}},
                  "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
        result = executor.run(prompt)
        assert result["ok"], (name, result["error"], result.get("node_errors"))
        model = _node(comfy, LOADER).execute(**loader).result[0].patcher.model.inner
        layer_class, quant_type = LAYERS[loader["quantization"]]
        q = model.encoder.block[0].layer[0].SelfAttention.q
        bnb = {type(m).__name__ for m in model.modules()  # bitsandbytes layers, and ours built on them
               if any(c.__module__.startswith("bitsandbytes") for c in type(m).__mro__)}
        if layer_class is None:
            assert not bnb and isinstance(q, torch.nn.Linear), (name, bnb)
        else:
            assert bnb == {layer_class}, (name, bnb)
            assert getattr(q.weight, "quant_type", None) == quant_type, name


@pytest.fixture(scope="module")
def diffusers_text():
    """diffusers' PixArtSigmaPipeline text preprocessing (its caption cleaning really available)."""
    from diffusers import PixArtSigmaPipeline
    from diffusers.utils import is_bs4_available, is_ftfy_available

    assert is_bs4_available() and is_ftfy_available()
    pipe = PixArtSigmaPipeline.__new__(PixArtSigmaPipeline)  # only its text methods are used
    return lambda prompt, clean: pipe._text_preprocessing(prompt, clean_caption=clean)[0]


def test_every_caption_cleaning_label_encodes_the_reference_text(comfy, comfy_base, diffusers_text):
    """Text Encode with each saved value (and each cleaning label on a prompt that every cleaning changes) gives
    transformers' T5 embeddings of the text the reference makes: diffusers' cleaning, diffusers without cleaning
    (lowercase), and the original PixArt-Σ script's strip (scripts/inference.py: `prompt.strip()`)."""
    from transformers import AutoTokenizer, T5EncoderModel

    reference_text = {"diffusers": lambda p: diffusers_text(p, True), "lowercase": lambda p: diffusers_text(p, False),
                      "none": lambda p: p.strip()}
    assert len({f(HOSTILE) for f in reference_text.values()}) == 3  # the prompt tells the cleanings apart
    t5 = T5EncoderModel.from_pretrained(comfy_base / "models" / "diffusers" / PIPE / "text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(COMFY / "comfy" / "text_encoders" / "t5_tokenizer")
    handle = _node(comfy, LOADER).execute(t5_name=PIPE, quantization="none", dtype="fp32").result[0]
    cases = [{k: v for k, v in encode.items() if k != "t5"} for _, _, encode in _saved_inputs(comfy)]
    assert {c.get("caption_cleaning", "diffusers") for c in cases} == {"diffusers"}
    cases += [{"positive": HOSTILE, "negative": "", "max_tokens": 0, "caption_cleaning": label}
              for label in CLEANING_OPTIONS]
    for encode in cases:
        label = encode.get("caption_cleaning", "diffusers")
        positive = _node(comfy, ENCODE).execute(t5=handle, **encode).result[0]
        ids = tok([reference_text[label](encode["positive"])], return_tensors="pt")
        with torch.no_grad():
            want = t5(**ids).last_hidden_state
        assert positive.embeds.shape == want.shape, (label, positive.embeds.shape, want.shape)
        torch.testing.assert_close(positive.embeds, want, rtol=1e-5, atol=1e-5)


def test_a_value_that_was_never_a_label_is_refused(comfy, executor):
    """The core's own mode names are not widget values: a prompt holding one (ComfyUI 0.3.75 does not check a V3
    combo's value against its options) fails in the loader, naming the input and the labels, before loading."""
    prompt = {"1": {"class_type": LOADER, "inputs": {"t5_name": T5_FILE, "quantization": "8bit", "dtype": "auto"}},
              "2": {"class_type": ENCODE, "inputs": {"t5": ["1", 0], "positive": "a cat", "negative": "",
                                                     "max_tokens": 0}},
              "3": {"class_type": "PixArtSigmaConditioningToComfy", "inputs": {"conditioning": ["2", 0]}},
              "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    result = executor.run(prompt)
    assert not result["ok"]
    message = result["error"]["exception_message"]
    assert "quantization '8bit' is not one of ['none', '8-bit (bitsandbytes)', '4-bit nf4 (bitsandbytes)']" in message


def test_saved_scheduler_labels_map_to_an_id_and_back(comfy):
    """Every scheduler value of every example workflow (converted as ComfyUI's frontend converts it) and every
    label ever offered: a core scheduler id, whose label is the saved value again; the widgets offer exactly the
    saved labels, so old workflows load with the same values."""
    labels, schedulers = comfyui.pack("nodes.scheduler_labels"), comfyui.pack("pixart_core.schedulers")
    samplers = ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "PixArtSigmaTiledRefine")
    saved = []
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        wf = json.loads(path.read_text())
        prompt = ui_to_api(wf, comfyui.object_info(comfy, {n["type"] for n in wf["nodes"]}))
        saved += [n["inputs"]["scheduler"] for n in prompt.values() if n["class_type"] in samplers]
    assert saved and set(saved) <= set(SAVED_SCHEDULER_LABELS)
    for label in saved + SAVED_SCHEDULER_LABELS:
        scheduler_id = labels.to_id(label)
        assert scheduler_id in schedulers.SCHEDULERS and labels.LABELS[scheduler_id] == label
    info = comfyui.object_info(comfy, samplers)
    offered = {c: info[c]["input"]["required"]["scheduler"] for c in samplers}
    for c in ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced"):
        assert offered[c][1]["options"] == SAVED_SCHEDULER_LABELS and offered[c][1]["default"] == "dpm++ 2m"
    assert offered["PixArtSigmaTiledRefine"][1]["options"] == SAVED_SCHEDULER_LABELS[:-1]  # no one-step DMD



def test_an_unknown_scheduler_label_is_refused_with_the_choices(comfy):
    """A label no saved workflow holds (e.g. ComfyUI's own 'karras'): refused, listing every label saved workflows use."""
    with pytest.raises(ValueError) as e:
        pack("nodes.scheduler_labels").to_id("karras")
    text = str(e.value)
    assert text.startswith("Unknown scheduler 'karras'; choose one of [") and text.endswith("].")
    assert all(repr(label) in text for label in SAVED_SCHEDULER_LABELS)


def test_a_caption_cleaning_value_that_is_no_label_is_refused(comfy, tiny_models):
    """A saved prompt holding the core's own name for a cleaning mode (not its label) fails in Text Encode, naming
    the input and the labels, before any text is encoded."""
    node = comfy.NODE_CLASS_MAPPINGS[ENCODE]
    t5 = comfy.NODE_CLASS_MAPPINGS[LOADER].execute(t5_name=T5_FILE, quantization="none", dtype="auto").result[0]
    with pytest.raises(ValueError) as e:
        node.execute(t5=t5, positive="a cat", negative="", max_tokens=0, caption_cleaning="DIFFUSERS")
    assert str(e.value) == "PixArt: caption_cleaning 'DIFFUSERS' is not one of ['diffusers', 'lowercase', 'none']."

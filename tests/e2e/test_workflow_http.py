"""The example workflow through a real ComfyUI HTTP server on 127.0.0.1, with the pack in its custom_nodes/, and bad
prompts (a wrong file, ComfyUI's CLIPLoader with a CLIP-L) answered clearly while the server keeps serving."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import NODE_IDS, REPO, queue_prompt
from harness.workflow import ui_to_api

TINY = {"t5xxl_fp16.safetensors": "tiny_t5xxl_fp16.safetensors",
        "PixArt-Sigma-XL-2-1024-MS": "tiny-PixArt-Sigma-XL-2-1024-MS",
        "sdxl_vae.safetensors": "tiny_sdxl_vae.safetensors"}


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server.url


def _api_prompt(url: str, workflow_path: Path) -> dict:
    object_info = requests.get(url + "/object_info", timeout=60).json()
    for node_id in NODE_IDS:
        assert node_id in object_info, f"{node_id} missing from the server's /object_info"
    prompt = ui_to_api(json.loads(workflow_path.read_text()), object_info)
    for node in prompt.values():
        for k, v in node["inputs"].items():
            if isinstance(v, str) and v in TINY:
                node["inputs"][k] = TINY[v]
        if node["class_type"] == "PixArtSigmaSampler":  # the example's 1024 px / 20 steps, shrunk for the CPU
            node["inputs"].update(width=64, height=64, steps=2)
    return prompt


def test_example_workflow_over_http(server, comfy_base):
    wf = REPO / "example_workflows" / "pixart_sigma_1024_t5_8bit.json"
    prompt = _api_prompt(server, wf)
    sampler = next(n for n in prompt.values() if n["class_type"] == "PixArtSigmaSampler")["inputs"]
    assert (sampler["seed"], sampler["cfg"], sampler["scheduler"]) == (0, 4.5, "dpm++ 2m")
    t5 = next(n for n in prompt.values() if n["class_type"] == "PixArtSigmaT5Loader")["inputs"]
    assert t5["quantization"] == "8-bit (bitsandbytes)"

    hist = queue_prompt(server, prompt)
    assert hist["status"]["status_str"] == "success", hist["status"]
    images = [i for out in hist["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1
    png = comfy_base / "output" / images[0]["subfolder"] / images[0]["filename"]
    arr = np.asarray(Image.open(png))
    assert arr.shape == (64, 64, 3) and arr.std() > 1.0


def test_example_workflow_listed_as_template(server):
    templates = requests.get(server + "/workflow_templates", timeout=30).json()
    assert "pixart_sigma_1024_t5_8bit" in templates.get("pixart_sigma_nodes", []), templates


def test_bad_prompt_over_http_then_server_keeps_serving(server):
    wf = REPO / "example_workflows" / "pixart_sigma_1024_t5_8bit.json"
    prompt = _api_prompt(server, wf)
    sampler = next(n for n in prompt.values() if n["class_type"] == "PixArtSigmaSampler")["inputs"]
    sampler["height"] = 50
    hist = queue_prompt(server, prompt)
    assert hist["status"]["status_str"] == "error"
    err = next(m[1] for m in hist["status"]["messages"] if m[0] == "execution_error")
    assert "height 50 is not a multiple of 16" in err["exception_message"] and "48 or 64" in err["exception_message"]
    sampler["height"], sampler["seed"] = 64, 1
    assert queue_prompt(server, prompt)["status"]["status_str"] == "success"


def test_cliploader_clip_l_gives_a_clear_error_in_the_server(comfy_server, comfy_base):
    """ComfyUI's own CLIPLoader output into Text Encode over HTTP: a CLIP-L file is named, the server keeps
    serving. (A T5-XXL through CLIPLoader needs all 24 XXL layers, 9.5 GB: the tiny tests above build ComfyUI's
    classes with a tiny config instead.)"""
    path = comfy_base / "models" / "text_encoders" / "tiny_clip_l_only.safetensors"
    if not path.exists():  # ComfyUI recognises CLIP-L by this key (comfy/sd.py detect_te_model)
        save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(3072, 768, dtype=torch.float16)},
                  str(path))
    prompt = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": path.name, "type": "stable_diffusion"}},
        "2": {"class_type": "PixArtSigmaTextEncode",
              "inputs": {"t5": ["1", 0], "positive": "a fox", "negative": "", "max_tokens": 0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    info = requests.get(comfy_server.url + "/object_info/PixArtSigmaTextEncode", timeout=30).json()
    t5_type = info["PixArtSigmaTextEncode"]["input"]["required"]["t5"][0]
    assert set(t5_type.split(",")) == {"PIXART_T5", "CLIP"}
    hist = queue_prompt(comfy_server.url, prompt)
    assert hist["status"]["status_str"] == "error"
    err = next(m[1] for m in hist["status"]["messages"] if m[0] == "execution_error")
    assert "no T5-XXL" in err["exception_message"] and "CLIP-L" in err["exception_message"], err
    logging.getLogger(__name__).info("server answered: %s", err["exception_message"])
    assert requests.get(comfy_server.url + "/system_stats", timeout=30).ok

"""Every example workflow in a real ComfyUI server (127.0.0.1, the pack in custom_nodes/, tiny models under the
official file names): queued over HTTP, run by the headless runner's --server mode, and opened in the real ComfyUI
frontend (headless Debian chromium + Playwright) with no missing node types or invalid widget values, its
graphToPrompt() equal to our converter's output. Screenshots go to .cache/test-artifacts/frontend/."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import EXAMPLES, REPO, queue_prompt, run_script

from harness import frontend
from harness.comfyui import make_base
from harness.download import CATALOG
from harness.graphs import example as load
from harness.graphs import shrink
from harness.location import PACK
from harness.server import serve
from harness.workflow import ui_to_api

ARTIFACTS = REPO / ".cache" / "test-artifacts" / "frontend"


@pytest.fixture(scope="module")
def base(examples_base) -> Path:
    return examples_base


@pytest.fixture(scope="module")
def server(examples_server) -> str:
    return examples_server


@pytest.fixture(scope="module")
def object_info(examples_object_info) -> dict:
    return examples_object_info


run = run_script


def test_examples_have_distinct_ids():
    ids = [load(name)["id"] for name in EXAMPLES]
    assert len(set(ids)) == len(ids), ids


def test_examples_are_listed_as_templates(server):
    templates = requests.get(server + "/workflow_templates", timeout=30).json()
    assert sorted(templates.get(PACK, [])) == EXAMPLES
    for name in EXAMPLES:  # each with its thumbnail
        assert (REPO / "example_workflows" / f"{name}.jpg").is_file(), name


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_over_http(server, object_info, base, name):
    prompt = shrink(ui_to_api(load(name), object_info))
    hist = queue_prompt(server, prompt)
    assert hist["status"]["status_str"] == "success", hist["status"]
    images = [i for out in hist["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1
    arr = np.asarray(Image.open(base / "output" / images[0]["subfolder"] / images[0]["filename"]).convert("RGB"))
    side = max([64] + [n["inputs"]["width"] for n in prompt.values() if n["class_type"] == "PixArtSigmaHiresUpscale"])
    assert arr.shape == (side, side, 3) and arr.std() > 1.0


def test_runner_against_server(server, tmp_path):
    """scripts/run --server: converts through the server's /object_info, queues, polls, fetches the PNG; a node
    failure is one line and exit status 1."""
    wf = REPO / "example_workflows" / "pixart_sigma_img2img.json"
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(img)
    r = run(wf, "--server", server, "--output", tmp_path / "out.png", "--image", img, "--width", 48, "--height", 32,
            "--steps", 3, "--seed", 5)
    assert r.returncode == 0, r.stderr[-3000:]
    out = Image.open(tmp_path / "out.png")
    assert out.size == (48, 32)  # the uploaded image, scaled by the workflow's ImageScale to the override size
    prompt = json.loads(out.info["prompt"])
    assert any(n["class_type"] == "LoadImage" and n["inputs"]["image"] == "in.png" for n in prompt.values())
    assert "PixArtSigmaSampler #4 [" in r.stderr  # progress from the server's websocket

    r = run(REPO / "example_workflows" / "pixart_alpha_512.json", "--server", server, "--width", 64, "--height", 50,
            "--steps", 2)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: node 4 (PixArtSigmaSampler) failed: ValueError: PixArt sampler: height 50 is not a multiple of 16")


# --- the real frontend -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(server):
    frontend.require_chromium()
    with frontend.Frontend(server) as fe:
        yield fe


@pytest.mark.parametrize("name", EXAMPLES)
def test_frontend_opens_example(browser, object_info, name):
    wf = load(name)
    report = browser.load(wf)
    assert report["missing"] == [], report
    assert report["invalid"] == [], report
    assert report["roundtrip"] == [], report
    assert (report["nodes"], report["links"]) == (len(wf["nodes"]), len(wf["links"]))
    # The frontend's own UI->API conversion is what our converter (runner, tests) produces.
    assert browser.to_prompt() == ui_to_api(wf, object_info)
    shot = browser.screenshot(ARTIFACTS / f"{name}.png")
    assert Image.open(shot).size[0] > 400
    assert browser.errors == [], browser.errors


def test_frontend_opens_a_workflow_saved_before_the_mask_input(browser, object_info):
    """Workflows saved before the sampler's optional mask socket (added last) load clean, widgets in place."""
    wf = load("pixart_sigma_img2img")
    sampler = next(n for n in wf["nodes"] if n["type"] == "PixArtSigmaSampler")
    sampler["inputs"] = [i for i in sampler["inputs"] if i["name"] != "mask"]
    report = browser.load(wf)
    assert report["missing"] == [] and report["invalid"] == [] and report["roundtrip"] == [], report
    assert browser.to_prompt() == ui_to_api(wf, object_info)
    assert browser.errors == [], browser.errors


# A bypassed (mode 4) node: the frontend passes its input of the matching type through, or drops the link when it
# has none. In the img2img example: ImageScale passes the image on (VAE Encode reads Load Image), the sampler passes
# its latent on (VAE Decode reads VAE Encode), VAE Encode has no LATENT input (the sampler gets no latent).
BYPASS_CASES = {9: ("11", "pixels", ["8", 0]), 4: ("6", "samples", ["11", 0]), 11: ("4", "latent", None)}


@pytest.mark.parametrize("node_id", sorted(BYPASS_CASES))
def test_bypassed_node_converts_as_the_frontend_does(browser, object_info, node_id):
    wf = load("pixart_sigma_img2img")
    next(n for n in wf["nodes"] if n["id"] == node_id)["mode"] = 4
    browser.load(wf)
    expected = browser.to_prompt()  # the frontend's own graphToPrompt is the reference
    target, name, source = BYPASS_CASES[node_id]
    assert str(node_id) not in expected and expected[target]["inputs"].get(name) == source, expected[target]
    assert ui_to_api(wf, object_info) == expected


def test_frontend_opens_a_t5_loader_saved_before_the_device_input(browser, object_info):
    """A workflow saved before the T5 loader had `device` (three widget values) opens in the real frontend
    with no missing node or invalid value, and the frontend's graphToPrompt sends the default device."""
    wf = load("pixart_sigma_1024_t5_8bit")
    loader = next(n for n in wf["nodes"] if n["type"] == "PixArtSigmaT5Loader")
    saved = loader["widgets_values"][:3]
    loader["widgets_values"] = saved
    report = browser.load(wf)
    assert report["missing"] == [] and report["invalid"] == [], report
    inputs = browser.to_prompt()[str(loader["id"])]["inputs"]
    assert [inputs[k] for k in ("t5_name", "quantization", "dtype")] == saved
    assert inputs["device"] == "default"


def test_examples_carry_download_metadata():
    """Every loader widget that names an official single .safetensors file carries its {name, url, directory}
    (ComfyUI templates' schema), url and folder from harness/download.py's table."""
    seen = set()
    for name in EXAMPLES:
        for node in load(name)["nodes"]:
            models = node["properties"].get("models", [])
            values = [v for v in node.get("widgets_values", []) if isinstance(v, str)]
            for v in values:
                entry = CATALOG.get(v)
                if entry and len(entry.files) == 1 and v.endswith(".safetensors"):
                    hub, local = entry.files[0]
                    want = {"name": v, "url": f"https://huggingface.co/{entry.repo}/resolve/main/{hub}",
                            "directory": local.split("/")[0]}
                    assert want in models, (name, node["type"], v)
                    seen.add(v)
            assert all(m["name"] in values for m in models), (name, node["type"])
    assert {"t5xxl_fp16.safetensors", "sdxl_vae.safetensors", "PixArt-Sigma-XL-2-1024-MS.safetensors"} <= seen


def test_frontend_missing_models_dialog_offers_the_official_files(browser, tmp_path_factory):
    """A server whose models folders are empty: the frontend's missing-models dialog lists each official file of
    the KSampler example as '<directory> / <name>' with its download URL."""
    wf = load("pixart_sigma_ksampler")
    want = {(m["directory"], m["name"], m["url"]) for n in wf["nodes"] for m in n["properties"].get("models", [])}
    assert len(want) == 3
    with serve(make_base(tmp_path_factory.mktemp("empty_models"))) as srv:
        frontend.apply_settings(srv.url)
        page = browser.browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(srv.url)
            page.wait_for_function("window.app && window.app.graph && window.app.extensionManager", timeout=90_000)
            page.evaluate("async (wf) => { await app.loadGraphData(structuredClone(wf)); }", wf)
            dialog = page.locator(".p-dialog", has_text="Missing Models")
            dialog.wait_for(timeout=30_000)
            text = dialog.inner_text()
            urls = dialog.locator("button[title]").evaluate_all("bs => bs.map(b => b.title)")
        finally:
            page.close()
    for directory, name, url in want:
        assert f"{directory} / {name}" in text, text
        assert url in urls, urls

"""The images the example workflows make, pinned: every example (tiny stand-ins under the official names, shrunk as
the HTTP example test shrinks them, fixed seeds) and variants of them that reach each scheduler and each sampler
mode, run over HTTP in a real ComfyUI server, must give the same pixels as the recorded ones.

The references were recorded from the code before the pack was reshaped (a change that must not change behaviour);
a change that changes an image on purpose records them again with PIXART_RECORD_EXAMPLE_IMAGES=1 and says why in its
commit. They hold on the machine class they were recorded on (CPU model, native bf16 or not, torch version: the
`auto` dtypes and the kernels depend on them); elsewhere the comparison is skipped, never loosened."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, queue_prompt

from harness.graphs import example as load
from harness.graphs import shrink
from harness.workflow import ui_to_api

REFERENCES = REPO / "tests" / "data" / "example_images"
RECORD = os.environ.get("PIXART_RECORD_EXAMPLE_IMAGES") == "1"
SCHEDULERS = ("dpm++ 2m", "sa-solver", "ddim", "euler", "euler ancestral", "unipc", "ddpm", "lcm", "dmd 1-step (t=400)")


def _machine() -> dict:
    from pixart_core import dtypes

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "native_bf16": dtypes.cpu_native_bf16(), "torch": torch.__version__.split("+")[0],
            "threads": torch.get_num_threads()}


def _nodes(prompt: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]


def _set(class_type: str, **values):
    def change(prompt: dict) -> None:
        targets = _nodes(prompt, class_type)
        assert targets, class_type
        for inputs in targets:
            inputs.update(values)
    return change


def _both(*changes):
    def change(prompt: dict) -> None:
        for c in changes:
            c(prompt)
    return change


def _square_mask(prompt: dict, class_type: str, name: str) -> None:
    """A 64 px mask repainting the 32 px square in its middle (SolidMask + MaskComposite), into that input."""
    prompt["900"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    prompt["901"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    prompt["902"] = {"class_type": "MaskComposite", "inputs": {"destination": ["900", 0], "source": ["901", 0],
                                                               "x": 16, "y": 16, "operation": "add"}}
    for inputs in _nodes(prompt, class_type):
        inputs[name] = ["902", 0]


# (variant id, example, change to its shrunk API prompt)
VARIANTS: list[tuple[str, str, object]] = [
    (f"example-{name}", name, None) for name in sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
]
VARIANTS += [(f"scheduler-{s.split(' ')[0] if s.startswith('dmd') else s.replace(' ', '_')}",
              "pixart_sigma_1024_t5_gguf", _set("PixArtSigmaSampler", scheduler=s, steps=3)) for s in SCHEDULERS]
VARIANTS += [
    # img2img with a stochastic scheduler (generator continues after the initial noise)
    ("img2img-euler_ancestral", "pixart_sigma_img2img", _set("PixArtSigmaSampler", scheduler="euler ancestral", steps=4)),
    # the example's image has no alpha (LoadImage's mask is empty): a square to repaint, from core mask nodes, on
    # the latent's noise_mask and on the sampler's own mask input
    ("inpaint-square", "pixart_sigma_inpaint", lambda p: _square_mask(p, "SetLatentNoiseMask", "mask")),
    ("inpaint-square_sa_solver", "pixart_sigma_inpaint",
     _both(lambda p: _square_mask(p, "SetLatentNoiseMask", "mask"), _set("PixArtSigmaSampler", scheduler="sa-solver"))),
    ("inpaint-sampler_mask", "pixart_sigma_inpaint", lambda p: _square_mask(p, "PixArtSigmaSampler", "mask")),
    # guidance on the Advanced sampler
    ("advanced-rescale", "pixart_sigma_pag", _set("PixArtSigmaSamplerAdvanced", pag_scale=0.0, guidance_rescale=0.7)),
    ("advanced-pag_rescale", "pixart_sigma_pag", _set("PixArtSigmaSamplerAdvanced", guidance_rescale=0.5)),
    ("advanced-interval", "pixart_sigma_pag",
     _set("PixArtSigmaSamplerAdvanced", pag_scale=0.0, steps=4, cfg_start=0.25, cfg_end=0.75)),
    ("advanced-pag_layers", "pixart_sigma_pag", _set("PixArtSigmaSamplerAdvanced", pag_layers="blocks.0, blocks.1")),
    ("advanced-dmd_599", "pixart_sigma_pag",
     _set("PixArtSigmaSamplerAdvanced", scheduler="dmd 1-step (t=400)", pag_scale=0.0, cfg=1.0, dmd_timestep=599)),
    ("advanced-ddim", "pixart_sigma_pag", _set("PixArtSigmaSamplerAdvanced", scheduler="ddim", pag_scale=0.0)),
    # staged sampling: the solver state carried between stages, for the stateful schedulers
    *[(f"stages-{s.replace(' ', '_')}", "pixart_sigma_two_stage", _set("PixArtSigmaSamplerAdvanced", scheduler=s))
      for s in ("sa-solver", "euler ancestral", "unipc", "ddpm", "ddim")],
    # stage 2 restarting (no leftover noise kept: the first stage jumps to its clean estimate)
    ("stages-restart", "pixart_sigma_two_stage", lambda p: [i.update(return_with_leftover_noise="disable")
                                                            for i in _nodes(p, "PixArtSigmaSamplerAdvanced")
                                                            if i["start_step"] == 0]),
    # hires and tiles off the example's defaults
    ("hires-latent_area", "pixart_sigma_4k", _set("PixArtSigmaHiresUpscale", method="latent", upscale_mode="area")),
    ("tiles-default_size", "pixart_sigma_4k", _both(_set("PixArtSigmaTiledRefine", tile_width=0, tile_height=0,
                                                         overlap=0, scheduler="unipc"))),
]


@pytest.fixture(scope="module")
def base(examples_base) -> Path:
    return examples_base


@pytest.fixture(scope="module")
def server(examples_server) -> str:
    return examples_server


@pytest.fixture(scope="module")
def object_info(examples_object_info) -> dict:
    return examples_object_info


@pytest.fixture(scope="module")
def recorded() -> dict:
    if RECORD:
        REFERENCES.mkdir(parents=True, exist_ok=True)
        (REFERENCES / "machine.json").write_text(json.dumps(_machine(), indent=1) + "\n")
        return {}
    machine = json.loads((REFERENCES / "machine.json").read_text())
    if machine != _machine():
        pytest.skip(f"the example images were recorded on {machine}; this machine is {_machine()}")
    return json.loads((REFERENCES / "hashes.json").read_text())


def _image(base: Path, hist: dict) -> np.ndarray:
    images = [i for out in hist["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1, images
    path = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("variant,example,change", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_example_image_is_unchanged(server, object_info, base, recorded, variant, example, change):
    prompt = shrink(ui_to_api(copy.deepcopy(load(example)), object_info))
    if change is not None:
        change(prompt)
    hist = queue_prompt(server, prompt)
    assert hist["status"]["status_str"] == "success", hist["status"]
    pixels = _image(base, hist)
    assert pixels.std() > 1.0  # an image, not a flat fill
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    if RECORD:
        hashes_file = REFERENCES / "hashes.json"
        hashes = json.loads(hashes_file.read_text()) if hashes_file.is_file() else {}
        hashes[variant] = digest
        hashes_file.write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")
        Image.fromarray(pixels).save(REFERENCES / f"{variant}.png")
        return
    want = np.asarray(Image.open(REFERENCES / f"{variant}.png").convert("RGB"))
    diff = np.abs(want.astype(int) - pixels.astype(int))
    assert digest == recorded[variant], (f"{variant}: the image changed (max pixel difference {diff.max()}, "
                                         f"{(diff > 0).mean():.1%} of values)")

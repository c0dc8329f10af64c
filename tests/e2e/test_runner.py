"""The headless runner (scripts/run) as a user runs it: every example workflow in one in-process run on tiny
stand-in models, command-line overrides reaching the saved image's prompt (the steps override keeping each stage's
share), one-line errors and exit codes (an unreadable model file included), and the UI->API converter on the
frontend-only node kinds (Reroute, PrimitiveNode, Note, muted nodes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import COMFY, EXAMPLES, REPO, run_script

from harness import run as run_workflow
from harness import standins
from harness.graphs import advanced_sampler as _advanced
from harness.workflow import WorkflowError, ui_to_api

run = run_script


@pytest.fixture(scope="module")
def examples_run(tmp_path_factory):
    """All example workflows through ./scripts/run in one process, with an empty models folder (so every model is
    a tiny stand-in), small sizes and three steps (the 4K example's tiled refine, denoise 0.35, then runs one), and
    --prompt/--seed overrides."""
    tmp = tmp_path_factory.mktemp("runner")
    (tmp / "models").mkdir()
    r = run(*[REPO / "example_workflows" / f"{n}.json" for n in EXAMPLES], "--output", tmp / "img" / "{name}.png",
            "--models-dir", tmp / "models", "--output-dir", tmp / "out", "--width", 64, "--height", 64, "--steps", 3,
            "--prompt", "a red fox in the snow", "--seed", 7)
    return r, tmp


def test_runner_runs_all_examples(examples_run):
    r, _ = examples_run
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"{len(EXAMPLES)} of {len(EXAMPLES)} workflows ran" in r.stderr
    assert "Traceback" not in r.stderr
    # Loud, at the start and at the end of each run.
    assert r.stderr.count(run_workflow.TINY_WARNING) == 2 * len(EXAMPLES)
    assert "PixArtSigmaSampler #4 [" in r.stderr  # the per-step progress bar


@pytest.mark.parametrize("name", EXAMPLES)
def test_runner_example_image(examples_run, name):
    r, tmp = examples_run
    png = tmp / "img" / f"{name}.png"
    assert png.is_file(), r.stderr[-3000:]
    img = Image.open(png)
    arr = np.asarray(img.convert("RGB"))
    assert arr.shape == (64, 64, 3) and arr.std() > 1.0
    # ComfyUI's SaveImage metadata: the prompt that ran (overrides, tiny stand-ins) and the UI workflow.
    prompt = json.loads(img.info["prompt"])
    sampler = next(n["inputs"] for n in prompt.values()
                   if n["class_type"] in ("PixArtSigmaSampler", "PixArtSigmaSamplerAdvanced", "KSampler"))
    encode = next(n["inputs"] for n in prompt.values() if n["class_type"] == "PixArtSigmaTextEncode")
    assert (sampler["seed"], sampler["steps"], encode["positive"]) == (7, 3, "a red fox in the snow")
    names = [n["inputs"][k] for n in prompt.values() for k in ("t5_name", "dit_name", "vae_name") if k in n["inputs"]]
    assert names and all(v.startswith(standins.TINY_PREFIX) for v in names), names
    assert json.loads(img.info["workflow"])["nodes"]
    assert f"wrote {png}" in r.stderr


@pytest.fixture(scope="module")
def example_models(tmp_path_factory) -> Path:
    """A models/ folder with tiny models under the official file names."""
    return standins.example_base(tmp_path_factory.mktemp("base"), COMFY) / "models"


def test_runner_errors_are_one_line_each(tmp_path, examples_run, example_models):
    """API-format workflows: a validation error, a node failure, a missing model with --no-tiny, and one that runs;
    each failure is one 'error:' line, the exit status is 1, and nothing falls back to tiny models."""
    # The API-format prompt the runner saved in an example's PNG, with the official model names back in place.
    good = json.loads(Image.open(examples_run[1] / "img" / "pixart_sigma_1024_t5_8bit.png").info["prompt"])
    for node in good.values():
        for k, v in node["inputs"].items():
            if isinstance(v, str) and v.startswith(standins.TINY_PREFIX):
                node["inputs"][k] = v.removeprefix(standins.TINY_PREFIX).removeprefix("comfyvae-")
    sampler = next(k for k, n in good.items() if n["class_type"] == "PixArtSigmaSampler")
    t5 = next(k for k, n in good.items() if n["class_type"] == "PixArtSigmaT5Loader")
    good[sampler]["inputs"].update(width=64, height=64, steps=2)
    bad_value = json.loads(json.dumps(good))
    bad_value[sampler]["inputs"]["steps"] = 0
    bad_size = json.loads(json.dumps(good))
    bad_size[sampler]["inputs"]["height"] = 50
    no_model = json.loads(json.dumps(good))
    no_model[t5]["inputs"]["t5_name"] = "t5xxl_missing.safetensors"
    files = []
    for name, wf in (("bad_value", bad_value), ("bad_size", bad_size), ("no_model", no_model), ("good", good)):
        (tmp_path / f"{name}.json").write_text(json.dumps(wf))
        files.append(tmp_path / f"{name}.json")
    r = run(*files, "--no-tiny", "--models-dir", example_models, "--output-dir", tmp_path / "out",
            "--output", tmp_path / "{name}.png")
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, r.stderr[-3000:]
    assert errors[0].startswith(f"error: {files[0]}: the workflow is invalid: node {sampler} (PixArtSigmaSampler): "
                                "Value 0 smaller than min of 1: steps")
    assert errors[1].startswith(f"error: {files[1]}: node {sampler} (PixArtSigmaSampler) failed: ValueError: ")
    assert "height 50 is not a multiple of 16" in errors[1] and "48 or 64" in errors[1]
    assert errors[2].startswith(f"error: {files[2]}: model files not found in {example_models}: "
                                "t5xxl_missing.safetensors. Fetch them with ./scripts/download")
    assert "1 of 4 workflows ran; failed:" in r.stderr
    assert "Traceback" not in r.stderr and run_workflow.TINY_WARNING not in r.stderr
    assert Image.open(tmp_path / "good.png").size == (64, 64)


def test_runner_usage_errors(tmp_path):
    r = run(tmp_path / "nope.json")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.json'}: no such file"
    (tmp_path / "a.json").write_text("{}")
    r = run(tmp_path / "a.json", tmp_path / "a.json", "--output", tmp_path / "x.png")
    assert r.returncode == 2 and "--output needs {name}" in r.stderr


# --- the converter on what the frontend saves but never sends ------------------------------------------------

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL"], "output_name": ["MODEL"]},
    "Sample": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                      "text": ["STRING", {}]},
                         "optional": {"extra": ["MODEL", {}], "mode": ["COMBO", {"options": ["x", "y"]}]}},
               "input_order": {"required": ["model", "seed", "text"], "optional": ["extra", "mode"]},
               "output": ["IMAGE"], "output_name": ["IMAGE"]},
}


def _wf(nodes, links):
    return {"nodes": nodes, "links": links}


def test_converter_follows_reroutes_and_skips_frontend_only_nodes():
    wf = _wf([
        {"id": 1, "type": "Loader", "inputs": [], "widgets_values": ["b.safetensors"]},
        {"id": 2, "type": "Reroute", "inputs": [{"name": "", "link": 1}]},
        {"id": 3, "type": "PrimitiveNode", "widgets_values": ["from primitive"]},
        {"id": 4, "type": "Sample", "inputs": [{"name": "model", "link": 2}, {"name": "text", "link": 3,
                                                                               "widget": {"name": "text"}}],
         "widgets_values": [42, "randomize", "from primitive", "y"]},
        {"id": 5, "type": "Note", "widgets_values": ["just a note"]},
        {"id": 6, "type": "Loader", "mode": 4, "widgets_values": ["a.safetensors"]},  # bypassed
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 4, 0, "MODEL"], [3, 3, 0, 4, 2, "STRING"]])
    assert ui_to_api(wf, INFO) == {
        "1": {"class_type": "Loader", "inputs": {"name": "b.safetensors"}},
        "4": {"class_type": "Sample", "inputs": {"model": ["1", 0], "seed": 42, "text": "from primitive", "mode": "y"}},
    }


def test_converter_and_overrides_name_the_problem():
    with pytest.raises(WorkflowError, match="node 7: node type 'Nope' is not installed"):
        ui_to_api(_wf([{"id": 7, "type": "Nope"}], []), INFO)
    with pytest.raises(WorkflowError, match=r"node 1 \(Loader\): no widget value for 'name'"):
        ui_to_api(_wf([{"id": 1, "type": "Loader", "widgets_values": []}], []), INFO)
    prompt = {"1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}}}
    opts = run_workflow.parse_args(["x.json", "--prompt", "hello"])
    with pytest.raises(WorkflowError, match="--prompt: no node in this workflow has a 'positive' value"):
        run_workflow.apply_overrides(prompt, opts)


def test_tiny_pipeline_folder_named_by_several_loaders(tmp_path):
    """A diffusers pipeline folder that the T5, DiT and VAE loaders all name gets every part, whichever comes
    first (a stand-in written for one kind must not hide the others)."""
    tiny_models = standins

    dest = tmp_path / "diffusers" / "tiny-pixart_sigma_sdxlvae_T5_diffusers"
    for kind in ("t5", "vae", "dit"):
        assert not tiny_models.has_tiny(kind, dest)
        tiny_models.write_tiny(kind, dest, COMFY)
        assert tiny_models.has_tiny(kind, dest)
    assert {p.name for p in dest.iterdir()} == {"text_encoder", "tokenizer", "vae", "transformer"}
    assert not list(dest.parent.glob("*.tmp"))


def _without_read_override() -> None:
    """In a child process: give up root's power to read any file, so file permissions apply as for a user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped from the bounding set, gone after exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("folder,name,node", [
    ("text_encoders", "t5xxl_fp16.safetensors", "PixArtSigmaT5Loader"),
    ("diffusion_models", "PixArt-XL-2-512x512.pth", "PixArtSigmaDiTLoader"),
    ("vae", "vae-ft-mse-840000-ema-pruned.safetensors", "PixArtSigmaVAELoader"),
])
def test_unreadable_file(tmp_path, folder, name, node):
    """A model file ComfyUI lists but cannot read (chmod 000): the run fails at that loader with 'permission
    denied' and what to do. Runs the headless runner (a real in-process ComfyUI) as a process that file
    permissions apply to (as root: without CAP_DAC_OVERRIDE)."""
    import subprocess

    from conftest import REPO

    (tmp_path / "models" / folder).mkdir(parents=True)
    bad = tmp_path / "models" / folder / name
    bad.write_bytes(b"\0" * 64)
    bad.chmod(0)
    r = subprocess.run([str(REPO / "scripts" / "run"), str(REPO / "example_workflows" / "pixart_alpha_512.json"),
                        "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out"),
                        "--width", "64", "--height", "64", "--steps", "1"],
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=_without_read_override if os.geteuid() == 0 else None)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert f"({node}) failed" in last and name in last, last
    assert "permission denied" in last and "chmod a+r" in last, last
    assert "Traceback" not in r.stderr


def test_steps_override_keeps_each_stage_share():
    from harness.workflow import apply_overrides

    prompt = {"4": _advanced(end_step=12, return_with_leftover_noise="enable"),
              "10": _advanced(add_noise="disable", start_step=12)}
    for node in prompt.values():
        node["inputs"]["steps"] = 20
    apply_overrides(prompt, {"steps": 5})
    assert [(n["inputs"]["start_step"], n["inputs"]["end_step"], n["inputs"]["steps"]) for n in prompt.values()] == \
        [(0, 3, 5), (3, 10000, 5)]  # 12 of 20 -> 3 of 5; 0 and "to the end" stay

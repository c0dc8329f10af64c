"""Installing the pack the ways users do, from a snapshot of this working tree: ComfyUI-Manager's cm-cli from a
git URL into a fresh ComfyUI copy that then starts and lists our nodes; comfy-cli's `node validate` on pyproject;
`pip install -r requirements.txt` leaving an installed torch alone; and the pack without bitsandbytes."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement

from conftest import COMFY, REPO

from harness.server import serve

PACK_DIR = "pixart-sigma-nodes"
BIN = Path(sys.executable).parent


def node_ids() -> list[str]:
    """Every node id the pack's source declares."""
    return sorted(re.findall(r'node_id="([^"]+)"', "".join(p.read_text() for p in (REPO / "nodes").glob("*.py"))))


def requirement_lines() -> list[str]:
    return [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.split("#")[0].strip()]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """This working tree as a git repository (tracked + new files, without ignored ones) and a bare clone of it,
    named like the GitHub repository."""
    tmp = tmp_path_factory.mktemp("snapshot")
    src = tmp / PACK_DIR
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=src, check=True)
    subprocess.run([*git, "add", "-A"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=src, check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(tmp / f"{PACK_DIR}.git")], check=True)
    return tmp


def test_comfyui_manager_install_then_comfyui_lists_the_nodes(snapshot, tmp_path):
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(COMFY, comfy, ignore=shutil.ignore_patterns("custom_nodes", "output", "temp", "user",
                                                                "server-*.log", "__pycache__"))
    (comfy / "custom_nodes").mkdir()
    r = subprocess.run([str(BIN / "cm-cli"), "install", f"file://localhost{snapshot}/{PACK_DIR}.git"],
                       env={**os.environ, "COMFYUI_PATH": str(comfy)}, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert "[INSTALLED]" in out and "An error occurred" not in out and "[FAILED]" not in out, out[-4000:]
    installed = comfy / "custom_nodes" / PACK_DIR
    assert (installed / "__init__.py").is_file() and (installed / "example_workflows").is_dir()

    with serve(comfy, comfy) as srv:
        info = requests.get(srv.url + "/object_info", timeout=60).json()
    log = next(comfy.glob("server-*.log")).read_text()
    assert not re.search(r"IMPORT FAILED.*" + PACK_DIR, log) and f"Cannot import {installed}" not in log, log[-4000:]
    assert re.search(r"\d+\.\d+ seconds: .*custom_nodes/" + PACK_DIR + r"\s*$", log, re.M), log[-3000:]
    missing = [n for n in node_ids() if n not in info]
    assert len(node_ids()) >= 6 and not missing, missing
    assert all(info[n]["python_module"].startswith("custom_nodes.") for n in node_ids())


def test_comfy_cli_validates_pyproject(snapshot, tmp_path):
    src = snapshot / PACK_DIR
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    r = subprocess.run([str(BIN / "comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=src,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower() and re.fullmatch(r"[a-z0-9-]+", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "PixArt" in project["description"] and len(project["description"]) <= 300
    assert project["license"] and project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] == "pixart-sigma-nodes"
    assert comfy["DisplayName"] == "PixArt-Σ Nodes"
    assert comfy["Icon"].startswith("https://") and comfy["requires-comfyui"].startswith(">=")
    # The registry metadata and what Manager installs are the same list, and neither names torch.
    assert sorted(project["dependencies"]) == sorted(requirement_lines())
    names = {Requirement(r).name.lower() for r in requirement_lines()}
    assert not names & {"torch", "torchvision", "torchaudio", "xformers"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _venv_with_torch(tmp_path: Path) -> tuple[Path, set[str]]:
    """A fresh environment that has only torch (the test venv's own torch and its dependencies, linked in), as a
    ComfyUI install has before the pack's requirements; returns it and the linked distributions."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    dists = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    keep, todo = {}, [("torch", frozenset())]
    while todo:  # torch and everything it requires (extras followed), as pip would see them installed
        name, extras = todo.pop()
        d = dists.get(_norm(name))
        if d is None or (_norm(name), extras) in keep:
            continue
        keep[(_norm(name), extras)] = d
        for req in map(Requirement, d.requires or []):
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    linked = set()
    for d in {id(d): d for d in keep.values()}.values():
        for top in {f.parts[0] for f in d.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            src = Path(d.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
        linked.add(_norm(d.metadata["Name"]))
    assert {"torch", "triton"} <= linked
    return venv, linked


def test_requirements_leave_installed_torch_alone(tmp_path):
    """pip's plan for `-r requirements.txt` in an environment that has torch installs the pack's dependencies and
    touches no torch, CUDA or triton package."""
    venv, linked = _venv_with_torch(tmp_path)
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                        "--dry-run", "--quiet", "--report", str(report), "-r", str(REPO / "requirements.txt")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    planned = {_norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert {"diffusers", "transformers", "bitsandbytes"} <= planned
    touched = {p for p in planned if p in linked or p.startswith(("torch", "nvidia-", "cuda-", "triton"))}
    assert not touched, touched


EIGHT_BIT_T5 = r"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from pixart_core import t5 as ct5
from pixart_core import t5_spec

config = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
torch.manual_seed(0)
model = T5EncoderModel(config).eval()
path = Path(sys.argv[1]) / "t5xxl_fp16.safetensors"
save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}, str(path))
loaded = ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32)
tok = ct5.load_tokenizer([Path(sys.argv[2])])
emb, mask = ct5.encode(loaded, tok, "a red fox in the snow", 300, torch.device("cpu"))
ids = tok(["a red fox in the snow"], return_tensors="pt")
with torch.no_grad():
    want = model(**ids).last_hidden_state
cos = torch.nn.functional.cosine_similarity(emb.flatten(), want.flatten(), dim=0).item()
print("RESULT", type(loaded.model.encoder.block[0].layer[0].SelfAttention.q).__name__, bool(torch.isfinite(emb).all()), cos)
"""


def test_requirements_alone_run_the_8bit_t5(tmp_path):
    """`pip install -r requirements.txt` into an environment that has only torch (as ComfyUI's), then
    the 8-bit T5 path loads (transformers' bitsandbytes loader needs accelerate) and encodes close to fp32."""
    venv, _ = _venv_with_torch(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                        "-r", str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", EIGHT_BIT_T5, str(tmp_path),
                          str(COMFY / "comfy" / "text_encoders" / "t5_tokenizer")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    layer, finite, cos = next(x for x in run.stdout.splitlines() if x.startswith("RESULT ")).split()[1:]
    assert layer == "Linear8bitLt" and finite == "True" and float(cos) > 0.99, run.stdout
    assert "MatMul8bitLt" not in run.stderr  # bitsandbytes' per-matmul cast notice stays quiet


SITECUSTOMIZE = '''
"""Makes bitsandbytes look uninstalled: no import spec, no distribution metadata (as on a machine without it)."""
import sys


class _Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bitsandbytes":
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, context=None):
        find = getattr(self.inner, "find_distributions", None)
        return (d for d in (find(context) if find else ()) if (d.metadata["Name"] or "").lower() != "bitsandbytes")

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


def test_pack_without_bitsandbytes(tmp_path):
    """The pack loads and runs unquantized without bitsandbytes; the quantized modes say how to install it."""
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    wf = json.loads((REPO / "example_workflows" / "pixart_sigma_1024_t5_8bit.json").read_text())
    plain = json.loads(json.dumps(wf))
    next(n for n in plain["nodes"] if n["type"] == "PixArtSigmaT5Loader")["widgets_values"][1] = "none"
    (tmp_path / "quantized.json").write_text(json.dumps(wf))
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('bitsandbytes'))"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "None"
    r = subprocess.run([str(REPO / "scripts" / "run"), tmp_path / "quantized.json", tmp_path / "plain.json", "--tiny",
                        "--width", "64", "--height", "64", "--steps", "2", "--output", tmp_path / "{name}.png",
                        "--output-dir", tmp_path / "out"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "(PixArtSigmaT5Loader) failed: RuntimeError: bitsandbytes is not installed" in errors[0]
    assert "pip install" in errors[0] and "bitsandbytes>=0.48" in errors[0] and "'none'" in errors[0], errors
    assert (tmp_path / "plain.png").is_file() and not (tmp_path / "quantized.png").exists()

"""Test fixtures over the harness package: a real ComfyUI (COMFYUI_PATH, else the 0.3.75 copy scripts/test
fetched), tiny models in a temporary ComfyUI base directory, and this pack in its custom_nodes/."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import location, models
from harness.comfyui import NODE_IDS, Executor, init_comfy, make_base  # noqa: F401  (used by the tests)
from harness.server import queue_prompt, serve  # noqa: F401

# Nothing may reach a model hub: any attempt fails the test instead of going online.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = location.REPO
COMFY = location.use()  # before anything imports ComfyUI: .cache/comfyui (on pytest's pythonpath) -> this ComfyUI
EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


def run_script(*args, timeout: float = 600, env: dict | None = None):
    """./scripts/run with these arguments, as a user runs it (output captured)."""
    return subprocess.run([str(REPO / "scripts" / "run"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory: models/ with every tiny model, custom_nodes/ with this pack, output/."""
    base = make_base(tmp_path_factory.mktemp("comfy_base"))
    models.write_models(base / "models", COMFY)
    return base


@pytest.fixture(scope="session")
def tiny_models(comfy_base):
    """The in-memory reference models that were written into comfy_base (same weights)."""
    return {"t5": models.make_t5(), "dit": models.make_dit(), "vae": models.make_vae()}


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI initialised in this process (CPU), with the pack loaded from custom_nodes/."""
    return init_comfy(comfy_base)


@pytest.fixture(scope="session")
def executor(comfy) -> Executor:
    return Executor(client_id="tests")


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    """A ComfyUI main.py on 127.0.0.1 (CPU) over the tests' base directory."""
    with serve(comfy_base) as server:
        yield server

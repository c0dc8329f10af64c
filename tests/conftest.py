"""Test fixtures over the harness package: a real ComfyUI (COMFYUI_PATH, else the 0.3.75 copy scripts/test
fetched), tiny models in a temporary ComfyUI base directory, and this pack in its custom_nodes/.

The tests are filed by tier (tests/README.md): tests/core (pixart_core alone, no ComfyUI), tests/nodes (the nodes in
ComfyUI's executor, in this process) and tests/e2e (a ComfyUI server, the frontend, the runner, install). Each test
gets its tier's marker from its folder, so `-m core` runs the core tier; a core test that imports ComfyUI fails.
Fixtures used by more than one file live here, once."""
from __future__ import annotations

import os
import subprocess
import sys
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
T5_TOKENIZER = COMFY / "comfy" / "text_encoders" / "t5_tokenizer"  # T5-v1.1's tokenizer as ComfyUI ships it
TESTS = Path(__file__).parent
TIERS = ("core", "nodes", "e2e")
COMFYUI_MODULES = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "execution")
_COMFYUI_BEFORE = pytest.StashKey[bool]()


def run_script(*args, timeout: float = 600, env: dict | None = None):
    """./scripts/run with these arguments, as a user runs it (output captured)."""
    return subprocess.run([str(REPO / "scripts" / "run"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------------ the tiers

@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Each test gets the marker of the tier folder it is in (tests/core -> core, ...)."""
    for item in items:
        parts = item.path.relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in TIERS:
            item.add_marker(parts[0])


def _comfyui_loaded() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in COMFYUI_MODULES)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_COMFYUI_BEFORE] = bool(_comfyui_loaded())


def pytest_runtest_teardown(item):
    """A core test must not import ComfyUI (checked where ComfyUI was not loaded before it, as in a run of the core
    tier alone or at the start of the whole suite, where tests/core runs first)."""
    if item.get_closest_marker("core") is None or item.stash.get(_COMFYUI_BEFORE, True):
        return
    loaded = _comfyui_loaded()
    if loaded:
        raise AssertionError(f"{item.nodeid} imported ComfyUI ({', '.join(loaded[:5])}); a test that needs ComfyUI "
                             "belongs in tests/nodes")


# ------------------------------------------------------------------------------ ComfyUI and the tiny models

@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory: models/ with every tiny model, custom_nodes/ with this pack, output/.

    $PIXART_TEST_MODELS names a folder that keeps the tiny models' files between sessions: written by the first
    session, copied by the later ones (the mutation run, harness/mutation.py, runs hundreds of sessions)."""
    base = make_base(tmp_path_factory.mktemp("comfy_base"))
    kept = os.environ.get("PIXART_TEST_MODELS")
    if not kept:
        models.write_models(base / "models", COMFY)
        return base
    import fcntl
    import shutil

    kept = Path(kept)
    kept.mkdir(parents=True, exist_ok=True)
    with open(kept.with_name(kept.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # sessions may start side by side
        if not (kept / ".written").exists():
            models.write_models(kept, COMFY)
            (kept / ".written").touch()
    shutil.copytree(kept, base / "models", symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".written"))
    return base


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny reference models in memory (the same weights as the files comfy_base holds: seeded)."""
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


@pytest.fixture(scope="module")
def examples_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory with a tiny stand-in at every file name the example workflows use."""
    from harness import standins

    return standins.example_base(tmp_path_factory.mktemp("examples_base"), COMFY)


@pytest.fixture(scope="module")
def examples_server(examples_base):
    """The URL of a ComfyUI server (127.0.0.1, CPU) over examples_base, for one test file."""
    with serve(examples_base) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def examples_object_info(examples_server) -> dict:
    """What examples_server answers to GET /object_info."""
    import requests

    return requests.get(examples_server + "/object_info", timeout=60).json()


# ------------------------------------------------------------------------------------- text and conditioning

@pytest.fixture(scope="module")
def tokenizer():
    """T5-v1.1's tokenizer (ComfyUI's copy), loaded as the pack loads it."""
    from pixart_core import t5 as ct5

    return ct5.load_tokenizer([T5_TOKENIZER])


@pytest.fixture
def int8_t5(tmp_path, tokenizer):
    """The tiny T5 loaded from an fp16 file in 8-bit (bitsandbytes), and the tokenizer."""
    import torch
    from safetensors.torch import save_file

    from pixart_core import t5 as ct5
    from pixart_core import t5_spec

    path = tmp_path / "t5.safetensors"
    save_file(models.t5_single_file_sd(models.make_t5()), str(path))
    return ct5.load_t5(path, t5_spec.QUANT_8BIT, torch.float32), tokenizer


@pytest.fixture(scope="module")
def conds():
    """A positive (9 real tokens) and a negative (1 real token) conditioning of the tiny T5's width, both 12 long
    with a padding mask: random, seeded."""
    import torch

    from pixart_core.conditioning import Conditioning

    torch.manual_seed(3)
    pos = Conditioning(torch.randn(1, 12, models.T5_WIDTH), torch.tensor([[1] * 9 + [0] * 3]))
    neg = Conditioning(torch.randn(1, 12, models.T5_WIDTH), torch.tensor([[1] + [0] * 11]))
    return pos, neg


@pytest.fixture(scope="module")
def dit_and_conds(conds):
    """The tiny DiT with the conds above: (dit, positive, negative)."""
    return (models.make_dit(), *conds)

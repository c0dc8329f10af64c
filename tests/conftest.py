"""Test harness: a real ComfyUI (COMFYUI_PATH, else the 0.3.75 copy scripts/test fetched), tiny models in a
temporary ComfyUI base directory, and this pack in its custom_nodes/."""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui-0.3.75")
PACK = "pixart_sigma_nodes"

# Nothing may reach a model hub: any attempt fails the test instead of going online.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

if not (COMFY / "main.py").is_file():
    raise RuntimeError(f"No ComfyUI at {COMFY}: run the tests through ./scripts/test or set COMFYUI_PATH.")
# ComfyUI's top-level modules (nodes, utils, app, ...) must win over same-named folders of this repo.
sys.path.insert(0, str(COMFY))
sys.path.append(str(REPO))  # `import pixart_core` for the pure tests
sys.path.append(str(Path(__file__).parent))  # `import tiny`
sys.path.append(str(REPO / "scripts"))  # the runner, downloader, server launcher, tiny-model builder

EXAMPLES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


def run_script(*args, timeout: float = 600, env: dict | None = None):
    """./scripts/run with these arguments, as a user runs it (output captured)."""
    import subprocess

    return subprocess.run([str(REPO / "scripts" / "run"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory: models/ with every tiny model, custom_nodes/ with this pack, output/."""
    import tiny

    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (base / d).mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    tiny.write_models(base / "models", COMFY)
    return base


@pytest.fixture(scope="session")
def tiny_models(comfy_base):
    """The in-memory reference models that were written into comfy_base (same weights)."""
    import tiny

    return {"t5": tiny.make_t5(), "dit": tiny.make_dit(), "vae": tiny.make_vae()}


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI initialised in this process (CPU), with the pack loaded from custom_nodes/."""
    return init_comfy(comfy_base)


def init_comfy(comfy_base: Path):
    """ComfyUI initialised in this process (CPU) over a base directory, with the pack loaded from custom_nodes/;
    returns ComfyUI's `nodes` module."""
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(comfy_base)
    args.disable_all_custom_nodes = False
    import folder_paths  # noqa: F401  (reads args.base_directory)
    import comfy.model_management  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    missing = [n for n in NODE_IDS if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"pack nodes not registered: {missing}")
    return nodes


NODE_IDS = ["PixArtSigmaT5Loader", "PixArtSigmaTextEncode", "PixArtSigmaDiTLoader", "PixArtSigmaSampler",
            "PixArtSigmaVAELoader", "PixArtSigmaVAEDecode"]


class EventSink:
    """The object ComfyUI's PromptExecutor reports to (the HTTP server in production): records its messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Executor:
    """Runs API-format prompts through ComfyUI's own validation and PromptExecutor, as its server's worker does."""

    def __init__(self):
        import execution

        self.sink = EventSink()
        self.executor = execution.PromptExecutor(self.sink, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    def run(self, prompt: dict) -> dict:
        """Returns {'ok': bool, 'error': message or validation errors, 'outputs': ui outputs by node}."""
        import execution

        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            return {"ok": False, "error": valid[1], "node_errors": valid[3], "outputs": {}}
        self.executor.execute(prompt, pid, {"client_id": "tests"}, valid[2])
        errors = [d for e, d in self.executor.status_messages if e in ("execution_error", "execution_interrupted")]
        return {"ok": self.executor.success, "error": errors[0] if errors else None,
                "outputs": self.executor.history_result.get("outputs", {}), "messages": self.executor.status_messages}


@pytest.fixture(scope="session")
def executor(comfy) -> Executor:
    return Executor()


class Server:
    """A ComfyUI main.py on 127.0.0.1 (CPU) over the tests' base directory."""

    def __init__(self, url: str, proc, log: Path):
        self.url, self.proc, self.log = url, proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid


def queue_prompt(url: str, prompt: dict, timeout: float = 300) -> dict:
    """POST an API-format prompt to a ComfyUI server and poll /history until it succeeded or failed."""
    import time

    import requests

    r = requests.post(url + "/prompt", json={"prompt": prompt, "client_id": "pytest"}, timeout=30)
    assert r.ok, r.text
    pid = r.json()["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(f"{url}/history/{pid}", timeout=10).json().get(pid, {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return requests.get(f"{url}/history/{pid}", timeout=10).json()[pid]
        time.sleep(0.3)
    raise TimeoutError(f"prompt {pid} did not finish")


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    import comfy_server as server_script

    with server_script.serve_process(COMFY, comfy_base) as (url, proc, log):
        yield Server(url, proc, log)

"""A real ComfyUI server on 127.0.0.1 with this pack, for the tests and scripts/make_thumbnails.py.

`example_base()` makes a ComfyUI base directory whose models/ holds tiny random models under the official file
names the example workflows use (so the frontend sees valid choices and no substitution is needed); `serve()`
starts `main.py` on a free port against it and stops it afterwards.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).parent))
import download_models  # noqa: E402
import run_workflow  # noqa: E402

KIND_BY_FOLDER = {"text_encoders": "t5", "checkpoints": "dit", "diffusion_models": "dit", "vae": "vae"}
COMFY_VAES = {"sdxl_vae.safetensors"}  # loaded by ComfyUI's own VAELoader in the img2img example


def example_base(base: Path, comfy_path: Path) -> Path:
    """base/{custom_nodes/<pack> -> this repo, models/ with a tiny model at every catalogued name, input/ ...}."""
    base = Path(base)
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    run_workflow.link_pack(base / "custom_nodes")
    models = base / "models"
    if not models.exists():  # the tiny models are built once, into the runner's tiny-model cache
        cache = run_workflow.TINY_DIR / "official-names"
        _write_example_models(cache, Path(comfy_path))
        models.symlink_to(cache, target_is_directory=True)
    example = Path(comfy_path) / "input" / "example.png"
    if example.is_file() and not (base / "input" / "example.png").exists():
        (base / "input" / "example.png").write_bytes(example.read_bytes())
    return base


def _write_example_models(models: Path, comfy_path: Path) -> None:
    import tiny_models

    for entry in download_models.CATALOG.values():
        local = Path(entry.files[0][1])
        if local.parts[0] == "diffusers":  # a diffusers folder: models/diffusers/<name>/{transformer,...}
            kind, dest = "dit", models / "diffusers" / local.parts[1]
        else:
            kind, dest = KIND_BY_FOLDER[local.parts[0]], models / local
        if not dest.exists():
            tiny_models.write_tiny(kind, dest, comfy_path, comfy_vae=entry.name in COMFY_VAES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(comfy_path: Path, base: Path, timeout: float = 180,
                  extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Run ComfyUI's main.py on a free 127.0.0.1 port (CPU) with this base directory; yields (URL, the server
    process, its log file) once it answers, and stops it afterwards."""
    import requests

    port = free_port()
    log_path = Path(base) / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--database-url", "sqlite:///:memory:", *extra_args],
                                cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    if requests.get(url + "/system_stats", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI server did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.3)
            yield url, proc, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def serve(comfy_path: Path, base: Path, timeout: float = 180, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """serve_process, yielding only the URL."""
    with serve_process(comfy_path, base, timeout, extra_args) as (url, _, _):
        yield url

"""A real ComfyUI server (its main.py) on 127.0.0.1 as a child process, and queueing prompts to it over HTTP."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import location


@dataclass
class Server:
    """A running ComfyUI main.py."""

    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(base: Path, comfy_path: Path | None = None, timeout: float = 180,
          extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """ComfyUI's main.py on a free 127.0.0.1 port (CPU) over a base directory (comfyui.make_base); yields the
    Server once it answers, and stops it afterwards."""
    import requests

    comfy_path = location.require(comfy_path)
    port = free_port()
    log_path = Path(base) / f"server-{port}.log"
    env = {k: v for k, v in location.child_env().items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
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
            yield Server(url, proc, log_path)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def queue_prompt(url: str, prompt: dict, timeout: float = 300, client_id: str = "harness",
                 extra_data: dict | None = None) -> dict:
    """POST an API-format prompt to a ComfyUI server and poll /history until it succeeded or failed; returns its
    history entry. A refused prompt (HTTP 400) raises ValueError with the server's answer."""
    import requests

    body = {"prompt": prompt, "client_id": client_id, **({"extra_data": extra_data} if extra_data else {})}
    r = requests.post(url + "/prompt", json=body, timeout=30)
    if r.status_code == 400:
        raise ValueError(r.text)
    r.raise_for_status()
    pid = r.json()["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(f"{url}/history/{pid}", timeout=10).json().get(pid, {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return requests.get(f"{url}/history/{pid}", timeout=10).json()[pid]
        time.sleep(0.3)
    raise TimeoutError(f"prompt {pid} did not finish within {timeout} s")

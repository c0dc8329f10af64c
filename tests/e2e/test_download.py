"""scripts/download against a local HTTP server on 127.0.0.1 standing in for the Hugging Face hub (the network is
replaced only at the HTTP boundary): where each file lands, resume from .part with a Range request, skipping
complete files, the hub's redirect + X-Linked-Etag SHA-256 check, servers that ignore Range."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import subprocess
import threading

import pytest

from conftest import REPO

from harness import download as download_models


class Hub:
    """Serves /<repo>/resolve/main/<path> like the hub: LFS files redirect (302, X-Linked-Etag/-Size) to a CDN
    path that honours Range; `cut_after` drops the connection after that many bytes of one response."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None
        self.honour_range = True
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                m = re.match(r"^/(.+?/.+?)/resolve/main/(.+)$", self.path)
                if m:
                    key = f"{m.group(1)}/{m.group(2)}"
                    if key not in hub.files:
                        return self._send(404, b"Entry not found")
                    data = hub.files[key]
                    if key.endswith(".json"):  # small git files are served directly
                        return self._send(200, data)
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{key}")
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.startswith("/cdn/"):
                    data = hub.files[self.path[5:]]
                    rng = self.headers.get("Range") if hub.honour_range else None
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                    if start >= len(data) and rng:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start:]
                    self.send_response(206 if rng else 200)
                    if rng:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if hub.cut_after is not None:
                        self.wfile.write(body[:hub.cut_after])
                        hub.cut_after = None
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                    return
                self._send(404, b"no")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, entry: download_models.Entry, size: int) -> dict[str, bytes]:
        out = {}
        for hub_path, local in entry.files:
            data = b"{}" if hub_path.endswith(".json") else os.urandom(size)
            self.files[f"{entry.repo}/{hub_path}"] = data
            out[local] = data
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


def test_default_set_lands_in_comfyui_folders(hub, tmp_path):
    expected = {}
    for name in download_models.DEFAULT_SET:
        expected.update(hub.add(download_models.CATALOG[name], 50_000))
    assert set(expected) == {
        "diffusers/PixArt-Sigma-XL-2-1024-MS/transformer/config.json",
        "diffusers/PixArt-Sigma-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
        "vae/sdxl_vae.safetensors",
    }
    # The real CLI, as a user runs it (scripts/download = bootstrap + this module), with HF_ENDPOINT -> local hub.
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    r = subprocess.run([str(REPO / "scripts" / "download"), "--models-dir", str(tmp_path / "models")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for local, data in expected.items():
        assert (tmp_path / "models" / local).read_bytes() == data, local
    assert not list((tmp_path / "models").rglob("*.part"))
    assert "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors" in r.stderr
    assert {p for p, _ in hub.requests if "/resolve/" in p} == {
        "/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/resolve/main/transformer/config.json",
        "/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/resolve/main/transformer/diffusion_pytorch_model.safetensors",
        "/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "/stabilityai/sdxl-vae/resolve/main/sdxl_vae.safetensors",
    }

    # A second run finds every file complete and asks the hub nothing.
    hub.requests.clear()
    r = subprocess.run([str(REPO / "scripts" / "download"), "--models-dir", str(tmp_path / "models")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr.count("already complete") == 4, r.stderr
    assert hub.requests == []


def test_every_catalog_entry_has_a_comfyui_home(tmp_path):
    for entry in download_models.CATALOG.values():
        for hub_path, local in entry.files:
            assert local.split("/")[0] in ("diffusers", "text_encoders", "checkpoints", "vae", "controlnet"), local
            assert download_models.file_url("https://huggingface.co", entry.repo, hub_path) == \
                f"https://huggingface.co/{entry.repo}/resolve/main/{hub_path}"


def test_broken_connection_resumes_from_part_file(hub, tmp_path):
    entry = download_models.CATALOG["sdxl_vae.safetensors"]
    data = hub.add(entry, 3_000_000)["vae/sdxl_vae.safetensors"]
    dest = tmp_path / "vae" / "sdxl_vae.safetensors"
    hub.cut_after = 2_500_000
    with pytest.raises(download_models.DownloadError, match="run the same command again to resume"):
        download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"), retries=0)
    part = dest.with_name(dest.name + ".part")
    kept = part.stat().st_size  # whole chunks written before the break
    assert not dest.exists() and 0 < kept <= 2_500_000 and part.read_bytes() == data[:kept]

    hub.requests.clear()
    download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"), retries=0)
    assert dest.read_bytes() == data and not part.exists()
    assert ("/cdn/stabilityai/sdxl-vae/sdxl_vae.safetensors", f"bytes={kept}-") in hub.requests


def test_retry_resumes_within_one_run(hub, tmp_path):
    entry = download_models.CATALOG["t5xxl_fp16.safetensors"]
    data = hub.add(entry, 2_000_000)["text_encoders/t5xxl_fp16.safetensors"]
    hub.cut_after = 1_500_000
    download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"), retries=1, backoff=0)
    assert (tmp_path / "text_encoders" / "t5xxl_fp16.safetensors").read_bytes() == data
    ranges = [r for p, r in hub.requests if r and p.startswith("/cdn/")]
    assert len(ranges) == 1 and 0 < int(ranges[0][6:-1]) <= 1_500_000, hub.requests


def test_server_ignoring_range_restarts_cleanly(hub, tmp_path):
    entry = download_models.CATALOG["sdxl_vae.safetensors"]
    data = hub.add(entry, 500_000)["vae/sdxl_vae.safetensors"]
    part = tmp_path / "vae" / "sdxl_vae.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:123_456])
    hub.honour_range = False
    messages = io.StringIO()
    download_models.download([entry], tmp_path, endpoint=hub.url, stream=messages)
    assert (tmp_path / "vae" / "sdxl_vae.safetensors").read_bytes() == data
    assert ("/cdn/stabilityai/sdxl-vae/sdxl_vae.safetensors", "bytes=123456-") in hub.requests  # it asked to resume
    assert "does not resume; starting again" in messages.getvalue()


def test_complete_part_file_is_finished_without_refetching(hub, tmp_path):
    entry = download_models.CATALOG["sdxl_vae.safetensors"]
    data = hub.add(entry, 200_000)["vae/sdxl_vae.safetensors"]
    part = tmp_path / "vae" / "sdxl_vae.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"))
    assert (tmp_path / "vae" / "sdxl_vae.safetensors").read_bytes() == data
    # one ranged request past the end (answered 416), no second download of the bytes
    assert [r for p, r in hub.requests if p.startswith("/cdn/")] == [f"bytes={len(data)}-"], hub.requests


def test_corrupt_download_fails_sha256_and_is_removed(hub, tmp_path):
    entry = download_models.CATALOG["sdxl_vae.safetensors"]
    data = hub.add(entry, 300_000)["vae/sdxl_vae.safetensors"]
    part = tmp_path / "vae" / "sdxl_vae.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # a stale .part from another file: the resumed result cannot match the hub's hash
    with pytest.raises(download_models.DownloadError, match="SHA-256 mismatch"):
        download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"))
    assert not part.exists() and not (tmp_path / "vae" / "sdxl_vae.safetensors").exists()
    download_models.download([entry], tmp_path, endpoint=hub.url, stream=open(os.devnull, "w"))
    assert (tmp_path / "vae" / "sdxl_vae.safetensors").read_bytes() == data


def test_missing_file_and_unknown_name_fail_clearly(hub, tmp_path):
    with pytest.raises(download_models.DownloadError, match="not found at .*HTTP 404"):
        download_models.download([download_models.CATALOG["sdxl_vae.safetensors"]], tmp_path, endpoint=hub.url,
                                 stream=open(os.devnull, "w"))
    r = subprocess.run([str(REPO / "scripts" / "download"), "no-such-model.safetensors",
                        "--models-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown model no-such-model.safetensors" in r.stderr


def test_runner_download_then_run(hub, tmp_path):
    """scripts/run --download: fetches what the workflow names from the (stand-in) hub into --models-dir, then runs
    on those files with no tiny stand-ins. The files served are tiny models in the official layouts."""
    from harness.standins import write_tiny

    made = tmp_path / "made"
    write_tiny("dit", made / "PixArt-Sigma-XL-2-1024-MS")
    write_tiny("t5", made / "t5xxl_fp16.safetensors")
    write_tiny("vae", made / "sdxl_vae.safetensors")
    for name in download_models.DEFAULT_SET:
        entry = download_models.CATALOG[name]
        for hub_path, local in entry.files:
            src = made / "PixArt-Sigma-XL-2-1024-MS" / hub_path if name.startswith("PixArt") else made / name
            hub.files[f"{entry.repo}/{hub_path}"] = src.read_bytes()
    models = tmp_path / "models"
    r = subprocess.run([str(REPO / "scripts" / "run"), str(REPO / "example_workflows" / "pixart_sigma_1024_t5_8bit.json"),
                        "--download", "--models-dir", str(models), "--output-dir", str(tmp_path / "out"),
                        "--output", str(tmp_path / "out.png"), "--width", "64", "--height", "64", "--steps", "2"],
                       env={**os.environ, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (models / "text_encoders" / "t5xxl_fp16.safetensors").is_file()
    assert (models / "diffusers" / "PixArt-Sigma-XL-2-1024-MS" / "transformer" / "config.json").is_file()
    assert "TINY RANDOM" not in r.stderr and (tmp_path / "out.png").is_file()

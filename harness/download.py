"""Fetch the official PixArt model files from the Hugging Face hub into ComfyUI's model folders.

Plain HTTPS GETs of https://huggingface.co/<repo>/resolve/main/<path> (HF_ENDPOINT or --endpoint changes the host,
e.g. for a mirror; HF_TOKEN is sent where a repository needs a login). Each file is written to <name>.part and
renamed when complete; an interrupted download resumes from the .part file (HTTP Range) on the next run, and files
already complete are skipped. Where the hub gives a SHA-256 (X-Linked-Etag), the file is checked against it.

    ./scripts/download                      # the PixArt-Σ 1024 set: transformer, T5-XXL fp16, SDXL VAE
    ./scripts/download PixArt-Sigma-XL-2-2K-MS.pth
    ./scripts/download --list
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import IO

from .location import comfyui_path

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that did not complete; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model as a workflow names it, and the hub files that make it up (hub path -> path under models/)."""

    name: str
    repo: str
    files: tuple[tuple[str, str], ...]
    about: str


CATALOG: dict[str, Entry] = {e.name: e for e in [
    Entry("PixArt-Sigma-XL-2-1024-MS", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
          (("transformer/config.json", "diffusers/PixArt-Sigma-XL-2-1024-MS/transformer/config.json"),
           ("transformer/diffusion_pytorch_model.safetensors",
            "diffusers/PixArt-Sigma-XL-2-1024-MS/transformer/diffusion_pytorch_model.safetensors")),
          "PixArt-Σ XL/2 1024 transformer, diffusers folder (~2.4 GB)"),
    Entry("PixArt-Sigma-XL-2-1024-MS.safetensors", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
          (("transformer/diffusion_pytorch_model.safetensors", "checkpoints/PixArt-Sigma-XL-2-1024-MS.safetensors"),),
          "PixArt-Σ XL/2 1024 transformer as one file (the diffusers folder's weights, ~2.4 GB)"),
    Entry("t5xxl_fp16.safetensors", "comfyanonymous/flux_text_encoders",
          (("t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp16.safetensors"),),
          "T5-v1.1-XXL encoder, fp16 (~9.8 GB)"),
    Entry("t5-v1_1-xxl-encoder-Q8_0.gguf", "city96/t5-v1_1-xxl-encoder-gguf",
          (("t5-v1_1-xxl-encoder-Q8_0.gguf", "text_encoders/t5-v1_1-xxl-encoder-Q8_0.gguf"),),
          "T5-v1.1-XXL encoder, GGUF Q8_0 (~5.1 GB; kept quantized in memory)"),
    Entry("sdxl_vae.safetensors", "stabilityai/sdxl-vae",
          (("sdxl_vae.safetensors", "vae/sdxl_vae.safetensors"),),
          "SDXL VAE, for PixArt-Σ (~335 MB)"),
    Entry("PixArt-Sigma-XL-2-2K-MS.pth", "PixArt-alpha/PixArt-Sigma",
          (("PixArt-Sigma-XL-2-2K-MS.pth", "checkpoints/PixArt-Sigma-XL-2-2K-MS.pth"),),
          "PixArt-Σ XL/2 2K transformer, original release file (~2.4 GB)"),
    Entry("PixArt-XL-2-512x512.pth", "PixArt-alpha/PixArt-alpha",
          (("PixArt-XL-2-512x512.pth", "checkpoints/PixArt-XL-2-512x512.pth"),),
          "PixArt-α XL/2 512 transformer, original release file (~2.4 GB)"),
    Entry("vae-ft-mse-840000-ema-pruned.safetensors", "stabilityai/sd-vae-ft-mse-original",
          (("vae-ft-mse-840000-ema-pruned.safetensors", "vae/vae-ft-mse-840000-ema-pruned.safetensors"),),
          "SD VAE (ft-MSE), for PixArt-α (~335 MB)"),
    Entry("PixArt-XL-2-1024-MS.pth", "PixArt-alpha/PixArt-alpha",
          (("PixArt-XL-2-1024-MS.pth", "checkpoints/PixArt-XL-2-1024-MS.pth"),),
          "PixArt-α XL/2 1024 transformer, original release file (~2.4 GB)"),
    Entry("PixArt-XL-2-1024-ControlNet.pth", "PixArt-alpha/PixArt-ControlNet",
          (("PixArt-XL-2-1024-ControlNet.pth", "controlnet/PixArt-XL-2-1024-ControlNet.pth"),),
          "PixArt-δ ControlNet for PixArt-α 1024 (trained on HED edges): the authors' whole checkpoint, 0.9B "
          "parameters with its base DiT (the ControlNet Loader reads only its control blocks)"),
]}
DEFAULT_SET = ("PixArt-Sigma-XL-2-1024-MS", "t5xxl_fp16.safetensors", "sdxl_vae.safetensors")


def default_models_dir() -> Path:
    return comfyui_path() / "models"


def file_url(endpoint: str, repo: str, path: str) -> str:
    return f"{endpoint.rstrip('/')}/{repo}/resolve/main/{path}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"


class _Progress:
    def __init__(self, label: str, total: int | None, start: int, stream: IO[str]):
        self.label, self.total, self.done, self.start = label, total, start, start
        self.stream, self.tty = stream, stream.isatty()
        self.t0 = self.last = time.time()
        self.last_decile = -1

    def add(self, n: int) -> None:
        self.done += n
        now = time.time()
        pct = int(100 * self.done / self.total) if self.total else None
        if self.tty and now - self.last >= 0.5:
            self.last = now
            self.stream.write("\r" + self.line(now) + " " * 8)
            self.stream.flush()
        elif not self.tty and pct is not None and pct // 10 > self.last_decile:
            self.last_decile = pct // 10
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        speed = (self.done - self.start) / max(now - self.t0, 1e-6)
        of = f" / {_size(self.total)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"  {self.label}: {_size(self.done)}{of} {_size(speed)}/s"

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(time.time()) + " " * 8 + "\n")
            self.stream.flush()


def _sha256_from(responses) -> str | None:
    """The hub's SHA-256 of an LFS file (X-Linked-Etag on the redirect, or a 64-hex ETag), else None."""
    for r in responses:
        for key in ("X-Linked-Etag", "ETag"):
            tag = (r.headers.get(key) or "").strip().removeprefix("W/").strip('"')
            if re.fullmatch(r"[0-9a-f]{64}", tag):
                return tag
    return None


def _total_from(r) -> int | None:
    rng = r.headers.get("Content-Range", "")
    m = re.search(r"/(\d+)\s*$", rng)
    if m:
        return int(m.group(1))
    length = r.headers.get("Content-Length")
    return int(length) if length and r.status_code == 200 else None


def fetch(url: str, dest: Path, session, token: str | None = None, stream: IO[str] = sys.stderr,
          label: str | None = None) -> str:
    """Download url to dest through dest.part, resuming a previous .part. Returns 'skipped' or 'downloaded'."""
    import requests

    dest = Path(dest)
    label = label or dest.name
    if dest.is_file():
        stream.write(f"  {label}: already complete ({dest})\n")
        return "skipped"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(2):  # a second pass only when the .part must be dropped (server ignores it / is stale)
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "pixart-sigma-nodes-download/1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            r = session.get(url, headers=headers, stream=True, timeout=(30, 120), allow_redirects=True)
        except requests.RequestException as e:
            raise DownloadError(f"{label}: cannot reach {url}: {e}") from e
        with r:
            if r.status_code == 416:  # nothing after `offset`: the .part may already be whole
                total = _total_from(r)
                if total is not None and total == offset:
                    break
                part.unlink()
                continue
            if r.status_code in (401, 403):
                raise DownloadError(f"{label}: {url} answered HTTP {r.status_code}: this repository needs a Hugging Face "
                                    "login. Accept its license on the hub and set HF_TOKEN to an access token.")
            if r.status_code == 404:
                raise DownloadError(f"{label}: not found at {url} (HTTP 404)")
            if r.status_code not in (200, 206):
                raise DownloadError(f"{label}: {url} answered HTTP {r.status_code}")
            if r.status_code == 206:
                m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != offset:
                    raise DownloadError(f"{label}: the server sent a range that does not continue {part.name}")
                mode = "ab"
            else:
                if offset:
                    stream.write(f"  {label}: the server does not resume; starting again\n")
                offset, mode = 0, "wb"
            total = _total_from(r)
            if total is not None:
                free = shutil.disk_usage(dest.parent).free
                if total - offset > free:
                    raise DownloadError(f"{label}: needs {_size(total - offset)} more, only {_size(free)} free in "
                                        f"{dest.parent}")
            sha = _sha256_from([*r.history, r])
            progress = _Progress(label, total, offset, stream)
            if offset:
                stream.write(f"  {label}: resuming at {_size(offset)}\n")
            try:
                with open(part, mode) as f:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                        progress.add(len(chunk))
            except (requests.RequestException, OSError) as e:
                progress.close()
                got = part.stat().st_size if part.is_file() else 0
                raise DownloadError(f"{label}: the connection broke after {_size(got)}"
                                    f"{' of ' + _size(total) if total else ''}; run the same command again to "
                                    f"resume ({e.__class__.__name__})") from e
            progress.close()
        got = part.stat().st_size
        if total is not None and got != total:
            raise DownloadError(f"{label}: got {_size(got)} of {_size(total)}; run the same command again to resume")
        if sha:
            stream.write(f"  {label}: checking SHA-256\n")
            h = hashlib.sha256()
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(CHUNK * 8), b""):
                    h.update(block)
            if h.hexdigest() != sha:
                part.unlink()
                raise DownloadError(f"{label}: SHA-256 mismatch (the hub says {sha}); the partial file was removed, "
                                    "run the same command again")
        break
    else:
        raise DownloadError(f"{label}: could not resume {part}; delete it and run again")
    part.replace(dest)
    return "downloaded"


def download(entries, models_dir: Path, endpoint: str | None = None, token: str | None = None,
             stream: IO[str] = sys.stderr, retries: int = 3, backoff: float = 1.0) -> list[Path]:
    """Fetch every file of these catalog entries into models_dir (resuming, skipping complete files)."""
    import requests

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = token or os.environ.get("HF_TOKEN") or None
    files = [(file_url(endpoint, e.repo, hub), Path(models_dir) / local, f"{e.repo}/{hub}")
             for e in entries for hub, local in e.files]
    with requests.Session() as session:
        for i, (url, dest, label) in enumerate(files, 1):
            stream.write(f"[{i}/{len(files)}] {label} -> {dest}\n")
            for attempt in range(retries + 1):
                try:
                    fetch(url, dest, session, token, stream, label)
                    break
                except DownloadError as e:
                    if attempt == retries or "run the same command again to resume" not in str(e):
                        raise
                    stream.write(f"  {e}\n  retrying ({attempt + 1}/{retries})\n")
                    time.sleep(backoff * min(2 ** attempt, 10))
    return [dest for _, dest, _ in files]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/download", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Names (see --list): " + ", ".join(CATALOG))
    p.add_argument("names", nargs="*", help="models to fetch, as workflows name them (default: the PixArt-Σ 1024 set)")
    p.add_argument("--all", action="store_true", help="every model in the list")
    p.add_argument("--list", action="store_true", help="list the models this script knows and exit")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="ComfyUI models folder (default: $COMFYUI_PATH/models, else the ComfyUI that scripts/run uses)")
    p.add_argument("--endpoint", default=None, help=f"hub URL (default: $HF_ENDPOINT, else {DEFAULT_ENDPOINT})")
    p.add_argument("--retries", type=int, default=3, help="resume this many times after a broken connection")
    opts = p.parse_args(argv)
    models_dir = opts.models_dir or default_models_dir()
    if opts.list:
        for e in CATALOG.values():
            done = all((models_dir / local).is_file() for _, local in e.files)
            print(f"{'[x]' if done else '[ ]'} {e.name:42} {e.about}  <- {e.repo}")
        return 0
    unknown = [n for n in opts.names if n not in CATALOG]
    if unknown:
        print(f"error: unknown model {', '.join(unknown)}; known: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    names = list(CATALOG) if opts.all else (opts.names or list(DEFAULT_SET))
    try:
        download([CATALOG[n] for n in names], models_dir, opts.endpoint, stream=sys.stderr, retries=opts.retries)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"done: {', '.join(names)} in {models_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

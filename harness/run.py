"""Headless runner: run a ComfyUI workflow (UI or API format) with this pack and write the image.

In-process by default: ComfyUI's own prompt validation and executor, with only this pack loaded as a custom node
(from a private custom_nodes/ folder). With --server URL: against a running ComfyUI (POST /prompt, progress over
its websocket, poll /history, fetch the image through /view). Model files the workflow names that are missing are
replaced by tiny random models (in-process only), and the run says so loudly.

    ./scripts/run example_workflows/pixart_sigma_1024_t5_8bit.json --output out.png
    ./scripts/run wf.json --prompt "a red fox" --seed 7 --width 1024 --height 768 --output fox.png
    ./scripts/run wf.json --server http://127.0.0.1:8188 --output out.png

Exit status: 0 on success; 1 when the workflow is invalid or a node fails (one line on stderr says why);
2 for bad command-line use.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from . import comfyui, download, location, server, standins
from .workflow import (VIRTUAL_NODES, WorkflowError, apply_overrides as _apply_overrides, comfy_vae_names,
                       is_api_format, load_workflow, missing_models, model_references, set_input_image, ui_to_api)

log = logging.getLogger("pixart-run")
TINY_WARNING = "THIS IMAGE IS FROM TINY RANDOM WEIGHTS: it is noise, not PixArt."
RunError = WorkflowError  # a failure the user can act on; its message is the one line the runner prints


def apply_overrides(prompt: dict, opts: argparse.Namespace) -> None:
    """--prompt/--negative/--seed/--steps/--width/--height onto the prompt."""
    try:
        _apply_overrides(prompt, {"positive": opts.prompt, "negative": opts.negative, "seed": opts.seed,
                                  "steps": opts.steps, "width": opts.width, "height": opts.height})
    except WorkflowError as e:
        name = str(e)
        raise RunError(f"--{ {'positive': 'prompt'}.get(name, name)}: no node in this workflow has a {name!r} "
                       "value to set") from None


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    bar = "!" * width
    print("\n".join([bar, *(f"! {x.ljust(width - 4)} !" for x in lines), bar]), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Progress and messages

class Progress:
    """A per-node progress bar on stderr (redrawn in place on a terminal, one line per 10% otherwise)."""

    def __init__(self, label: Callable[[str | None], str], stream=sys.stderr):
        self.label, self.stream = label, stream
        self.tty = stream.isatty()
        self.start: dict[str | None, tuple[float, int]] = {}  # per node: time and value of its first report
        self.last_pct: dict[str | None, int] = {}
        self.lock = threading.Lock()

    def __call__(self, value: int, total: int, preview=None, node_id: str | None = None) -> None:
        with self.lock:
            now = time.time()
            t0, v0 = self.start.setdefault(node_id, (now, value))
            if value <= 0 or total <= 0:
                return
            pct = int(100 * value / total)
            rate = f" {(now - t0) / (value - v0):.2f} s/step" if value > v0 else ""
            width = 30
            done = int(width * value / total)
            line = f"{self.label(node_id)} [{'#' * done}{'-' * (width - done)}] {value}/{total}{rate}"
            if self.tty:
                self.stream.write("\r" + line + ("\n" if value >= total else ""))
                self.stream.flush()
            elif pct // 10 > self.last_pct.get(node_id, -1) // 10 or value >= total:
                self.stream.write(line + "\n")
                self.stream.flush()
            self.last_pct[node_id] = pct
            if value >= total:
                self.start.pop(node_id, None)
                self.last_pct.pop(node_id, None)


def save_images(images: list[tuple[Path | bytes, str]], output: Path) -> list[Path]:
    """Write the run's images to --output (the first) and output_2.png ... (the rest of a batch)."""
    from PIL import Image

    written = []
    output.parent.mkdir(parents=True, exist_ok=True)
    for i, (src, name) in enumerate(images):
        dest = output if i == 0 else output.with_name(f"{output.stem}_{i + 1}{output.suffix}")
        data = src.read_bytes() if isinstance(src, Path) else src
        if dest.suffix.lower() == Path(name).suffix.lower():
            dest.write_bytes(data)  # byte copy keeps ComfyUI's embedded workflow metadata
        else:
            import io

            Image.open(io.BytesIO(data)).convert("RGB").save(dest)
        written.append(dest)
    return written


# ---------------------------------------------------------------------------------------------------------------
# In-process ComfyUI

class _QuietExecutionErrors(logging.Filter):
    """ComfyUI logs a traceback for every node failure and each validation error; the runner prints one line
    instead (--verbose shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.pathname.endswith("execution.py"))


class _Once(logging.Filter):
    """Each distinct warning once (bitsandbytes warns on every 8-bit matmul)."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if record.levelno != logging.WARNING or key not in self.seen:
            self.seen.add(key)
            return True
        return False


_NODES = None


def comfy_nodes(opts: argparse.Namespace):
    """ComfyUI's `nodes` module, initialised once per process (on the GPU when there is one, unless --cpu)."""
    global _NODES
    if _NODES is None:
        import torch

        os.environ["COMFYUI_PATH"] = str(Path(opts.comfyui).absolute())
        try:
            location.require()
        except RuntimeError as e:
            raise RunError(f"{e} (or pass --comfyui DIR)") from None
        gpu = torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available()
        try:
            _NODES = comfyui.init_comfy(cpu=opts.cpu or not gpu, models_dir=opts.models_dir,
                                        output_dir=opts.output_dir, quiet=not opts.verbose)
        except RuntimeError as e:
            raise RunError(f"{e} (run with --verbose to see why)") from None
        if not opts.verbose:
            import transformers

            transformers.utils.logging.disable_progress_bar()
    return _NODES


def run_in_process(workflow: dict, opts: argparse.Namespace, output: Path | None) -> list[Path]:
    nodes = comfy_nodes(opts)
    import folder_paths

    if is_api_format(workflow):
        prompt = copy.deepcopy(workflow)
        ui_workflow = None
        info = comfyui.object_info(nodes, {n["class_type"] for n in prompt.values()})
    else:
        info = comfyui.object_info(nodes, {n["type"] for n in workflow["nodes"]} - VIRTUAL_NODES)
        prompt = ui_to_api(workflow, info)
        ui_workflow = workflow
    unknown = sorted({n["class_type"] for n in prompt.values()} - set(nodes.NODE_CLASS_MAPPINGS))
    if unknown:
        raise RunError(f"node types not installed in this ComfyUI: {', '.join(unknown)} (missing node pack?)")
    apply_overrides(prompt, opts)
    if opts.image:
        set_input_image(prompt, _copy_to_input(Path(opts.image), folder_paths.get_input_directory()))

    missing = missing_models(prompt, info) if not opts.tiny else model_references(prompt)
    tiny = []
    if missing and opts.download and not opts.tiny:
        fetch_for_workflow(prompt, Path(folder_paths.models_dir))
        info = comfyui.object_info(nodes, {n["class_type"] for n in prompt.values()})
        missing = missing_models(prompt, info)
    if missing:
        if opts.no_tiny:
            names = ", ".join(sorted({m[3] for m in missing}))
            raise RunError(f"model files not found in {folder_paths.models_dir}: {names}. "
                           "Fetch them with ./scripts/download (or --download), or drop --no-tiny to smoke-test "
                           "with tiny random models")
        tiny = standins.provide(prompt, missing, comfy_vae_names(prompt))
        banner([f"Model files not found in {folder_paths.models_dir}:" if not opts.tiny else "--tiny given:",
                *(f"  {n}" for n in tiny),
                "Using TINY RANDOM models in their place (" + str(standins.TINY_DIR) + ").",
                TINY_WARNING,
                "Get the real files with: ./scripts/download   (or add --download)"])

    labels = {nid: f"{n['class_type']} #{nid}" for nid, n in prompt.items()}
    executor = comfyui.Executor(client_id="pixart-run")
    executor.on_progress = Progress(lambda nid: labels.get(str(nid or executor.sink.node), "progress"))
    extra = {"extra_pnginfo": {"workflow": ui_workflow}} if ui_workflow is not None else None
    result = executor.run(prompt, extra)
    if not result["ok"]:
        if not result["valid"]:
            raise RunError(comfyui.validation_message(result["error"], result["node_errors"], prompt))
        raise RunError(comfyui.execution_message(result["error"] or {}))
    log.info("ran in %.1f s", result["seconds"])
    images = []
    for out in result["outputs"].values():
        for img in out.get("images", []):
            base = Path(folder_paths.get_directory_by_type(img.get("type", "output")))
            images.append((base / img.get("subfolder", "") / img["filename"], img["filename"]))
    return finish(images, output, tiny)


def finish(images: list[tuple[Path | bytes, str]], output: Path | None, tiny: list[str]) -> list[Path]:
    if not images:
        if output:
            raise RunError("the workflow ran but produced no image (it needs a Save Image or Preview Image node)")
        print("done (the workflow produced no image)", file=sys.stderr)
        return []
    if output:
        paths = save_images(images, output)
    else:
        paths = [p for p, _ in images if isinstance(p, Path)]
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    if tiny:
        banner([TINY_WARNING, "Stand-ins were used for: " + ", ".join(tiny)])
    return paths


def _copy_to_input(src: Path, input_dir: str) -> str:
    if not src.is_file():
        raise RunError(f"--image {src}: no such file")
    dest = Path(input_dir) / src.name
    if dest.resolve() != src.resolve():
        shutil.copyfile(src, dest)
    return src.name


def fetch_for_workflow(prompt: dict, models_dir: Path) -> None:
    """--download: fetch the catalogued official files this workflow names into models_dir."""
    names = [v for _, _, _, v in model_references(prompt)]
    entries = [download.CATALOG[n] for n in names if n in download.CATALOG]
    unknown = sorted({n for n in names if n not in download.CATALOG})
    if unknown:
        log.warning("--download: no official source known for %s; put them in %s yourself", ", ".join(unknown),
                    models_dir)
    try:
        download.download(entries, models_dir)
    except download.DownloadError as e:
        raise RunError(str(e)) from e


# ---------------------------------------------------------------------------------------------------------------
# Against a running ComfyUI server

def run_on_server(workflow: dict, opts: argparse.Namespace, output: Path | None) -> list[Path]:
    import requests

    url = opts.server.rstrip("/")
    try:
        info = requests.get(url + "/object_info", timeout=60)
        info.raise_for_status()
    except requests.RequestException as e:
        raise RunError(f"cannot reach ComfyUI at {url}: {e}") from e
    info = info.json()
    if is_api_format(workflow):
        prompt, ui_workflow = copy.deepcopy(workflow), None
    else:
        prompt, ui_workflow = ui_to_api(workflow, info), workflow
    unknown = sorted({n["class_type"] for n in prompt.values()} - set(info))
    if unknown:
        raise RunError(f"node types not installed on {url}: {', '.join(unknown)} (missing node pack?)")
    apply_overrides(prompt, opts)
    if opts.image:
        set_input_image(prompt, _upload_image(url, Path(opts.image)))
    missing = missing_models(prompt, info)
    if missing:
        names = ", ".join(sorted({m[3] for m in missing}))
        raise RunError(f"the server at {url} does not have: {names} (tiny stand-ins exist only in-process; "
                       "run ./scripts/download --models-dir <that ComfyUI>/models on the server machine)")

    client_id = str(uuid.uuid4())
    labels = {nid: f"{n['class_type']} #{nid}" for nid, n in prompt.items()}
    progress = Progress(lambda nid: labels.get(str(nid), "progress"))
    stop, ready, ended = threading.Event(), threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(url, client_id, progress, stop, ready, ended),
                               daemon=True)
    watcher.start()
    ready.wait(10)  # the server sends progress only to a connected client: connect before queueing
    try:
        extra = {"extra_pnginfo": {"workflow": ui_workflow}} if ui_workflow is not None else None
        try:
            hist = server.queue_prompt(url, prompt, timeout=opts.timeout, client_id=client_id, extra_data=extra)
        except ValueError as e:  # the server refused the prompt (HTTP 400)
            data = json.loads(str(e))
            raise RunError(comfyui.validation_message(data.get("error", {}), data.get("node_errors", {}), prompt)) from None
        except TimeoutError as e:
            raise RunError(str(e)) from None
        if watcher.is_alive():
            ended.wait(5)  # the websocket may still carry the last progress events
    finally:
        stop.set()
    status = hist.get("status", {})
    if status.get("status_str") == "error" or not status.get("completed"):
        err = next((m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")), {})
        raise RunError(comfyui.execution_message(err))
    produced = [img for out in hist.get("outputs", {}).values() for img in out.get("images", [])]
    if not output:  # the images stay on the server: say where
        for img in produced:
            print(f"on the server: {img.get('type', 'output')}/{img.get('subfolder', '')}/{img['filename']}".replace("//", "/"),
                  file=sys.stderr)
        return []
    images = []
    for img in produced:
        r = requests.get(url + "/view", params={"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                                "type": img.get("type", "output")}, timeout=60)
        r.raise_for_status()
        images.append((r.content, img["filename"]))
    return finish(images, output, [])


def _upload_image(url: str, path: Path) -> str:
    import requests

    if not path.is_file():
        raise RunError(f"--image {path}: no such file")
    with open(path, "rb") as f:
        r = requests.post(url + "/upload/image", files={"image": (path.name, f, "image/png")},
                          data={"overwrite": "true"}, timeout=60)
    r.raise_for_status()
    d = r.json()
    return f"{d['subfolder']}/{d['name']}" if d.get("subfolder") else d["name"]


def _watch_progress(url: str, client_id: str, progress: Progress, stop: threading.Event,
                    ready: threading.Event, ended: threading.Event) -> None:
    """Per-step progress from the server's websocket ('progress' events); silent if the websocket is unavailable.
    Sets `ready` once connected (or once it is clear that it will not connect), `ended` when the prompt has ended."""
    try:
        import aiohttp
    except ImportError:
        ready.set()
        return

    async def watch():
        ws_url = url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ws_url, heartbeat=20) as ws:
                while not stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return
                        continue
                    data = json.loads(msg.data)
                    if data.get("type") == "status":  # sent once the server has registered this client
                        ready.set()
                    elif data.get("type") == "progress":
                        d = data["data"]
                        progress(d["value"], d["max"], node_id=d.get("node"))
                    elif data.get("type") in ("execution_success", "execution_error", "execution_interrupted") or (
                            data.get("type") == "executing" and (data.get("data") or {}).get("node") is None):
                        ended.set()

    try:
        asyncio.run(watch())
    except Exception as e:  # progress is a nicety; the run itself is checked through /history
        log.debug("progress websocket: %s", e)
    finally:
        ready.set()
        ended.set()


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Model files missing from the models folder are replaced by tiny random models "
                                       "(the image is then noise, and the run says so); --download fetches the "
                                       "official files first, --no-tiny refuses instead.")
    p.add_argument("workflows", nargs="+", type=Path, metavar="workflow",
                   help="workflow JSON: UI format (as saved by ComfyUI) or API format; several run one after another")
    p.add_argument("--output", "-o", help="write the image here (a batch adds _2, _3 ... to the name); with several "
                                          "workflows use {name} for the workflow's file name, e.g. out/{name}.png")
    p.add_argument("--prompt", help="positive prompt (PixArt-Σ Text Encode)")
    p.add_argument("--negative", help="negative prompt (PixArt-Σ Text Encode)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--image", type=Path, help="input image for the workflow's Load Image node (img2img)")
    p.add_argument("--server", metavar="URL", help="run on this ComfyUI server (e.g. http://127.0.0.1:8188) "
                                                   "instead of in-process")
    p.add_argument("--comfyui", default=str(location.comfyui_path()),
                   help="ComfyUI checkout to run in-process (default: $COMFYUI_PATH, else the copy scripts/run fetched)")
    p.add_argument("--models-dir", help="ComfyUI models folder (default: <comfyui>/models)")
    p.add_argument("--output-dir", help="where Save Image writes (default: <comfyui>/output)")
    p.add_argument("--download", action="store_true",
                   help="first fetch the official model files the workflow names, if missing (see scripts/download)")
    tiny = p.add_mutually_exclusive_group()
    tiny.add_argument("--no-tiny", action="store_true", help="fail when model files are missing")
    tiny.add_argument("--tiny", action="store_true", help="use tiny random models even where real files exist "
                                                          "(a quick smoke test of the workflow)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")
    p.add_argument("--timeout", type=float, default=3600, help="--server: seconds to wait for the result")
    p.add_argument("--verbose", "-v", action="store_true", help="ComfyUI's and the pack's log, tracebacks included")
    opts = p.parse_args(argv)
    if opts.server and (opts.tiny or opts.download):
        p.error("--tiny and --download work in-process only (not with --server)")
    if len(opts.workflows) > 1 and opts.output and "{name}" not in opts.output:
        p.error("with several workflows, --output needs {name} (e.g. out/{name}.png)")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    for h in logging.getLogger().handlers:
        h.addFilter(_Once())
        if not opts.verbose:
            h.addFilter(_QuietExecutionErrors())
    several = len(opts.workflows) > 1
    failed = []
    for path in opts.workflows:
        where = f"{path}: " if several else ""
        output = Path(opts.output.replace("{name}", path.stem)) if opts.output else None
        if several:
            print(f"=== {path}", file=sys.stderr, flush=True)
        try:
            try:
                workflow = load_workflow(path)
            except RunError as e:
                raise RunError(f"{'' if several else f'{path}: '}{e}") from None
            (run_on_server if opts.server else run_in_process)(workflow, opts, output)
        except RunError as e:
            print(f"error: {where}{e}", file=sys.stderr, flush=True)
            failed.append(path)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a bug or an unexpected environment: still one line, the traceback with --verbose
            if opts.verbose:
                import traceback

                traceback.print_exc()
            print(f"error: {where}unexpected {type(e).__name__}: {e} (run with --verbose for the traceback)",
                  file=sys.stderr, flush=True)
            failed.append(path)
    if several:
        print(f"{len(opts.workflows) - len(failed)} of {len(opts.workflows)} workflows ran"
              + (f"; failed: {', '.join(map(str, failed))}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

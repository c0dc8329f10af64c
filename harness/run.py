#!/usr/bin/env python3
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

REPO = Path(__file__).resolve().parents[1]
PACK = "pixart_sigma_nodes"
DEFAULT_COMFYUI = REPO / ".cache" / "comfyui-0.3.75"
TINY_DIR = REPO / ".cache" / "tiny-models" / "v1"  # bump when scripts/tiny_models.py changes what it writes
TINY_PREFIX = "tiny-random-"
log = logging.getLogger("pixart-run")


class RunError(Exception):
    """A failure the user can act on; its message is the one line the runner prints."""


# ---------------------------------------------------------------------------------------------------------------
# UI format -> API format (shared with the tests: tests/workflow.py re-exports ui_to_api)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # frontend-only: never sent to the server


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def combo_options(spec) -> list | None:
    """The choices of a combo input spec (V1: [[choices], opts]; V3: ["COMBO", {"options": [...]}]), else None."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def is_api_format(data: dict) -> bool:
    return "nodes" not in data and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt as the frontend's graphToPrompt does: widget values in
    input order (skipping the control_after_generate value after a seed), links, muted/bypassed nodes dropped,
    Reroute nodes followed to their source, Note and PrimitiveNode left out (a primitive's value is already in the
    target's widgets_values)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise RunError("this workflow uses subgraphs, which the headless runner does not convert; "
                       "export it in API format from ComfyUI (Workflow > Export (API)) and run that file")
    nodes_by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(link_id):
        """(node id, slot) feeding this link, through Reroutes; None for links from a PrimitiveNode."""
        link = links[link_id]
        origin = nodes_by_id.get(link[1])
        while origin is not None and origin["type"] == "Reroute":
            feeding = next((i.get("link") for i in origin.get("inputs", []) if i.get("link") is not None), None)
            if feeding is None:
                return None
            link = links[feeding]
            origin = nodes_by_id.get(link[1])
        if origin is None or origin["type"] == "PrimitiveNode" or origin.get("mode", 0) in (2, 4):
            return None
        return str(link[1]), link[2]

    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise RunError(f"node {node['id']}: node type {node['type']!r} is not installed in this ComfyUI "
                           "(missing node pack?)")
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", []) or list(specs)
        linked = {i["name"]: source(i["link"]) for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name in names:
            spec = specs[name]
            if _is_widget(spec):
                if not values:
                    raise RunError(f"node {node['id']} ({node['type']}): no widget value for {name!r} "
                                   "(saved by another version of the node?)")
                value = values.pop(0)
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate") or name in ("seed", "noise_seed") and spec[0] == "INT":
                    values.pop(0)
                inputs[name] = value
            if linked.get(name) is not None:
                inputs[name] = list(linked[name])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# Overrides and model files

MODEL_INPUTS = {  # (class_type, input) -> tiny model kind
    ("PixArtSigmaT5Loader", "t5_name"): "t5",
    ("PixArtSigmaDiTLoader", "dit_name"): "dit",
    ("PixArtSigmaVAELoader", "vae_name"): "vae",
    ("VAELoader", "vae_name"): "vae",
}


def apply_overrides(prompt: dict, opts: argparse.Namespace) -> None:
    """Set --prompt/--negative on PixArt text encoders and --seed/--steps/--width/--height wherever a node has
    that input as a plain value (not linked)."""
    wanted = {"positive": opts.prompt, "negative": opts.negative, "seed": opts.seed, "steps": opts.steps,
              "width": opts.width, "height": opts.height}
    for name, value in wanted.items():
        if value is None:
            continue
        hit = False
        for node in prompt.values():
            if name in ("positive", "negative") and node["class_type"] != "PixArtSigmaTextEncode":
                continue
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
                hit = True
        if not hit:
            flag = {"positive": "prompt"}.get(name, name)
            raise RunError(f"--{flag}: no node in this workflow has a {name!r} value to set")


def model_references(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(node id, input, kind, value) for every model file the workflow names."""
    refs = []
    for nid, node in prompt.items():
        for (cls, name), kind in MODEL_INPUTS.items():
            value = node["inputs"].get(name)
            if node["class_type"] == cls and isinstance(value, str):
                refs.append((nid, name, kind, value))
    return refs


def missing_models(prompt: dict, object_info: dict) -> list[tuple[str, str, str, str]]:
    """The model references whose value is not among the loader's choices (the file is not in models/)."""
    out = []
    for nid, name, kind, value in model_references(prompt):
        info = object_info[prompt[nid]["class_type"]]["input"]
        spec = {**info.get("required", {}), **info.get("optional", {})}[name]
        choices = combo_options(spec) or []
        if value not in choices:
            out.append((nid, name, kind, value))
    return out


def link_pack(custom_nodes: Path) -> None:
    """custom_nodes/<pack> -> this checkout (re-pointed if it names another or a moved one)."""
    link = custom_nodes / PACK
    if link.is_symlink() and link.resolve() == REPO.resolve():
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)


def tiny_name(value: str, comfy_vae: bool = False) -> str:
    """The tiny stand-in for a model name: the name (so a diffusers folder or a .pth keeps its layout and the
    variant hints in it), marked as tiny; a VAE that ComfyUI's own VAELoader loads is a separate, full-size one."""
    return TINY_PREFIX + ("comfyvae-" if comfy_vae else "") + value


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    bar = "!" * width
    print("\n".join([bar, *(f"! {x.ljust(width - 4)} !" for x in lines), bar]), file=sys.stderr, flush=True)


TINY_WARNING = "THIS IMAGE IS FROM TINY RANDOM WEIGHTS: it is noise, not PixArt."


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


def validation_message(error: dict, node_errors: dict, prompt: dict) -> str:
    """One line from ComfyUI's validate_prompt result."""
    parts = []
    for nid, err in (node_errors or {}).items():
        cls = err.get("class_type") or prompt.get(nid, {}).get("class_type", "?")
        for e in err.get("errors", []):
            detail = e.get("details") or ""
            if len(detail) > 300:
                detail = detail[:300] + "..."
            parts.append(f"node {nid} ({cls}): {e.get('message', '')}{': ' + detail if detail else ''}")
    if not parts:
        detail = error.get("details") if isinstance(error, dict) else ""
        parts.append((error.get("message", str(error)) if isinstance(error, dict) else str(error))
                     + (f": {detail}" if detail else ""))
    return "the workflow is invalid: " + "; ".join(parts)


def execution_message(err: dict) -> str:
    if "exception_message" not in err:  # execution_interrupted
        return f"interrupted at node {err.get('node_id')} ({err.get('node_type')})"
    msg = " ".join(str(err["exception_message"]).split())
    return f"node {err.get('node_id')} ({err.get('node_type')}) failed: {err.get('exception_type', 'Error')}: {msg}"


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

class _Sink:
    """What ComfyUI's PromptExecutor reports to (the HTTP server, in ComfyUI itself): remembers the running node."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    node: str | None = None

    def send_sync(self, event, data, sid=None):
        if event == "executing" and isinstance(data, dict):
            self.node = data.get("node")

    def queue_updated(self):
        pass


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


def init_comfy(opts: argparse.Namespace):
    """Import ComfyUI in this process with this pack as its only custom node; returns ComfyUI's `nodes` module."""
    comfy_path = Path(opts.comfyui).resolve()
    if not (comfy_path / "main.py").is_file():
        raise RunError(f"no ComfyUI at {comfy_path}: pass --comfyui DIR (a ComfyUI checkout) or use ./scripts/run, "
                       "which fetches ComfyUI 0.3.75")
    sys.path.insert(0, str(comfy_path))
    root = logging.getLogger()
    level = root.level
    if not opts.verbose:  # ComfyUI's start-up warnings (optional comfy_extras that need kornia, torchaudio, ...)
        root.setLevel(logging.ERROR)
    try:
        return _init_comfy(opts, comfy_path)
    finally:
        root.setLevel(level)


def _init_comfy(opts: argparse.Namespace, comfy_path: Path):
    import torch

    from comfy.cli_args import args

    # Arguments must be set before anything imports comfy.model_management.
    args.cpu = opts.cpu or not (torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available())
    args.disable_all_custom_nodes = False
    import folder_paths

    work = REPO / ".cache" / "run"
    custom = work / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link_pack(custom)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    if opts.models_dir:
        models = Path(opts.models_dir).absolute()
        old = folder_paths.models_dir
        for key, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
            new = [str(models / os.path.relpath(p, old)) if p.startswith(old + os.sep) else p for p in paths]
            folder_paths.folder_names_and_paths[key] = (new, exts)
        folder_paths.models_dir = str(models)
    if opts.output_dir:
        folder_paths.set_output_directory(str(Path(opts.output_dir).resolve()))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_user_directory(str(work / "user"))
    for d in (folder_paths.get_output_directory(), folder_paths.get_input_directory()):
        os.makedirs(d, exist_ok=True)

    import comfy.model_management  # noqa: F401
    import utils.extra_config  # ComfyUI's utils package, before nodes.py puts comfy/ first on sys.path
    import nodes

    extra = comfy_path / "extra_model_paths.yaml"
    if extra.is_file():  # as ComfyUI's main.py does
        utils.extra_config.load_extra_path_config(str(extra))

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if not opts.verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    if "PixArtSigmaSampler" not in nodes.NODE_CLASS_MAPPINGS:
        raise RunError(f"this pack did not load into ComfyUI at {comfy_path} (run with --verbose to see why)")
    return nodes


def node_info(nodes, class_type: str) -> dict:
    """What ComfyUI's GET /object_info/{class_type} answers (server.py's node_info, without the server)."""
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "name": class_type,
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}


def object_info(nodes, class_types) -> dict:
    return {c: node_info(nodes, c) for c in class_types if c in nodes.NODE_CLASS_MAPPINGS}


def provide_tiny_models(prompt: dict, missing) -> list[str]:
    """Write (or reuse) a tiny random model for each missing name, register the tiny folder with ComfyUI, and
    point the workflow at the tiny names. Returns the names that were replaced."""
    import folder_paths

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    comfy_vae_names = {v for nid, name, kind, v in model_references(prompt) if prompt[nid]["class_type"] == "VAELoader"}
    folders = {"t5": ("text_encoders", "diffusers"), "dit": ("checkpoints", "diffusers"), "vae": ("vae", "diffusers")}
    replaced = []
    for nid, name, kind, value in missing:
        is_file = Path(value).suffix.lower() in tiny_models.FILE_SUFFIXES
        folder = folders[kind][0 if is_file else 1]
        comfy_vae = kind == "vae" and value in comfy_vae_names
        dest = TINY_DIR / folder / tiny_name(value, comfy_vae)
        if not tiny_models.has_tiny(kind, dest):  # write_tiny is atomic: what exists is whole
            log.info("building a tiny random %s for %s: %s", kind, value, dest)
            tiny_models.write_tiny(kind, dest, Path(folder_paths.__file__).parent, comfy_vae=comfy_vae)
        prompt[nid]["inputs"][name] = dest.name
        if value not in replaced:
            replaced.append(value)
    for folder in ("text_encoders", "checkpoints", "vae", "diffusers"):
        (TINY_DIR / folder).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(folder, str(TINY_DIR / folder))
    return replaced


_NODES = None


def comfy_nodes(opts: argparse.Namespace):
    """ComfyUI's `nodes` module, initialised once per process."""
    global _NODES
    if _NODES is None:
        _NODES = init_comfy(opts)
    return _NODES


def run_in_process(workflow: dict, opts: argparse.Namespace, output: Path | None) -> list[Path]:
    nodes = comfy_nodes(opts)
    import comfy.utils
    import execution
    import folder_paths

    if is_api_format(workflow):
        prompt = copy.deepcopy(workflow)
        ui_workflow = None
        info = object_info(nodes, {n["class_type"] for n in prompt.values()})
    else:
        info = object_info(nodes, {n["type"] for n in workflow["nodes"]} - VIRTUAL_NODES)
        prompt = ui_to_api(workflow, info)
        ui_workflow = workflow
    unknown = sorted({n["class_type"] for n in prompt.values()} - set(nodes.NODE_CLASS_MAPPINGS))
    if unknown:
        raise RunError(f"node types not installed in this ComfyUI: {', '.join(unknown)} (missing node pack?)")
    apply_overrides(prompt, opts)
    if opts.image:
        set_input_image(prompt, Path(opts.image), lambda p: _copy_to_input(p, folder_paths.get_input_directory()))

    missing = missing_models(prompt, info) if not opts.tiny else model_references(prompt)
    tiny = []
    if missing and opts.download and not opts.tiny:
        fetch_for_workflow(prompt, opts, Path(folder_paths.models_dir))
        info = object_info(nodes, {n["class_type"] for n in prompt.values()})
        missing = missing_models(prompt, info)
    if missing:
        if opts.no_tiny:
            names = ", ".join(sorted({m[3] for m in missing}))
            raise RunError(f"model files not found in {folder_paths.models_dir}: {names}. "
                           "Fetch them with ./scripts/download (or --download), or drop --no-tiny to smoke-test "
                           "with tiny random models")
        tiny = provide_tiny_models(prompt, missing)
        banner([f"Model files not found in {folder_paths.models_dir}:" if not opts.tiny else "--tiny given:",
                *(f"  {n}" for n in tiny),
                "Using TINY RANDOM models in their place (" + str(TINY_DIR) + ").",
                TINY_WARNING,
                "Get the real files with: ./scripts/download   (or add --download)"])

    labels = {nid: f"{n['class_type']} #{nid}" for nid, n in prompt.items()}
    sink = _Sink()
    comfy.utils.set_progress_bar_global_hook(Progress(lambda nid: labels.get(str(nid or sink.node), "progress")))
    executor = execution.PromptExecutor(sink, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not valid[0]:
        raise RunError(validation_message(valid[1], valid[3], prompt))
    extra = {"client_id": "pixart-run"}
    if ui_workflow is not None:
        extra["extra_pnginfo"] = {"workflow": ui_workflow}
    t0 = time.time()
    executor.execute(prompt, pid, extra, valid[2])
    if not executor.success:
        err = next((d for e, d in executor.status_messages if e in ("execution_error", "execution_interrupted")), {})
        raise RunError(execution_message(err))
    log.info("ran in %.1f s", time.time() - t0)
    images = []
    for out in executor.history_result.get("outputs", {}).values():
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


def set_input_image(prompt: dict, path: Path, store: Callable[[Path], str]) -> None:
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    if not loaders:
        raise RunError("--image: this workflow has no Load Image node")
    name = store(path)
    for n in loaders:
        n["inputs"]["image"] = name


def fetch_for_workflow(prompt: dict, opts: argparse.Namespace, models_dir: Path) -> None:
    """--download: fetch the catalogued official files this workflow names into models_dir."""
    sys.path.insert(0, str(Path(__file__).parent))
    import download_models

    names = [v for _, _, _, v in model_references(prompt)]
    entries = [download_models.CATALOG[n] for n in names if n in download_models.CATALOG]
    unknown = sorted({n for n in names if n not in download_models.CATALOG})
    if unknown:
        log.warning("--download: no official source known for %s; put them in %s yourself", ", ".join(unknown),
                    models_dir)
    try:
        download_models.download(entries, models_dir)
    except download_models.DownloadError as e:
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
        set_input_image(prompt, Path(opts.image), lambda p: _upload_image(url, p))
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
        body = {"prompt": prompt, "client_id": client_id}
        if ui_workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": ui_workflow}}
        r = requests.post(url + "/prompt", json=body, timeout=60)
        if r.status_code == 400:
            data = r.json()
            raise RunError(validation_message(data.get("error", {}), data.get("node_errors", {}), prompt))
        r.raise_for_status()
        pid = r.json()["prompt_id"]
        deadline = time.time() + opts.timeout
        while True:
            hist = requests.get(f"{url}/history/{pid}", timeout=30).json()
            status = hist.get(pid, {}).get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                break
            if time.time() > deadline:
                raise RunError(f"prompt {pid} did not finish within {opts.timeout} s")
            time.sleep(0.3)
        if watcher.is_alive():
            ended.wait(5)  # the websocket may still carry the last progress events
    finally:
        stop.set()
    if status.get("status_str") == "error" or not status.get("completed"):
        err = next((m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")), {})
        raise RunError(execution_message(err))
    produced = [img for out in hist[pid].get("outputs", {}).values() for img in out.get("images", [])]
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
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(DEFAULT_COMFYUI),
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


def load_workflow(path: Path) -> dict:
    try:
        workflow = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError("no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"not a JSON workflow ({e})") from None
    if not isinstance(workflow, dict) or not ("nodes" in workflow or is_api_format(workflow)):
        raise RunError("neither a UI-format nor an API-format ComfyUI workflow")
    return workflow


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

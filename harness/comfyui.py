"""ComfyUI in this process: start-up with this pack as a custom node, one executor for API-format prompts, the pack's
modules as ComfyUI imported them, and runs under a memory cap (for out-of-memory tests).

The import path must already name ComfyUI (pytest: pyproject.toml's `pythonpath`; child processes:
location.child_env(); call location.use() first so that .cache/comfyui points at the right checkout).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from . import location

NODE_IDS = ["PixArtSigmaT5Loader", "PixArtSigmaTextEncode", "PixArtSigmaDiTLoader", "PixArtSigmaSampler",
            "PixArtSigmaSamplerAdvanced",
            "PixArtSigmaResolution", "PixArtSigmaVAELoader", "PixArtSigmaVAEDecode", "PixArtSigmaVAEEncode",
            "PixArtSigmaDiTToModel", "PixArtSigmaConditioningToComfy",
            "PixArtSigmaHiresUpscale", "PixArtSigmaTiledRefine", "PixArtSigmaLoraLoader",
            "PixArtSigmaControlNetLoader", "PixArtSigmaControlNetApply"]
RUN_DIR = location.REPO / ".cache" / "run"  # the runner's private custom_nodes/, temp/ and user/
_STARTED: dict = {}  # how ComfyUI was initialised in this process (init_comfy's arguments), once set


def link_pack(custom_nodes: Path) -> Path:
    """custom_nodes/<pack> -> this checkout (re-pointed if it names another or a moved one)."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / location.PACK
    if link.is_symlink() and link.resolve() == location.REPO.resolve():
        return link
    if link.is_symlink():
        link.unlink()
    link.symlink_to(location.REPO, target_is_directory=True)
    return link


def make_base(base: Path) -> Path:
    """A ComfyUI base directory (for --base-directory): custom_nodes/ with this pack, output/, input/, temp/, user/."""
    base = Path(base)
    for d in ("custom_nodes", "output", "input", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    link_pack(base / "custom_nodes")
    return base


def init_comfy(base: Path | None = None, *, pack: bool = True, cpu: bool = True, models_dir: Path | None = None,
               output_dir: Path | None = None, quiet: bool = False):
    """ComfyUI initialised in this process; returns ComfyUI's `nodes` module.

    base: a ComfyUI base directory (made with make_base) for models/, custom_nodes/, output/ ...; None keeps
    ComfyUI's own models/, input/ and output/ (and its extra_model_paths.yaml), with this pack in a private
    custom_nodes/ under .cache/run. pack=False starts ComfyUI without any custom node. quiet hides ComfyUI's
    start-up warnings (optional extras it cannot import).

    ComfyUI is initialised once per process. A later call (another pytest session in the same process, as in the
    mutation run) returns the nodes module again, with ComfyUI's folders moved to `base`'s if that is another base
    directory (the pack stays as ComfyUI loaded it); other arguments than the first call's are an error."""
    how = {"base": None if base is None else str(Path(base).absolute()), "pack": pack, "cpu": cpu,
           "models_dir": None if models_dir is None else str(Path(models_dir).absolute()),
           "output_dir": None if output_dir is None else str(Path(output_dir).resolve())}
    if _STARTED:
        if {**how, "base": how["base"] is None} != {**_STARTED, "base": _STARTED["base"] is None}:
            raise RuntimeError(f"ComfyUI was already initialised in this process with {_STARTED}; it cannot be "
                               f"initialised again with {how}: run it in a child Python (location.child_env())")
        if how["base"] != _STARTED["base"]:
            _move_base(sys.modules["folder_paths"], make_base(base))
            _STARTED["base"] = how["base"]
        return sys.modules["nodes"]
    comfy_path = location.use()
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        from comfy.cli_args import args

        args.cpu = cpu  # before anything imports comfy.model_management
        args.disable_all_custom_nodes = not pack
        if base is not None:
            args.base_directory = str(make_base(base))
        import folder_paths  # reads args.base_directory

        if base is None:
            folder_paths.folder_names_and_paths["custom_nodes"] = ([str(link_pack(RUN_DIR / "custom_nodes").parent)],
                                                                   set())
            folder_paths.set_temp_directory(str(RUN_DIR / "temp"))
            folder_paths.set_user_directory(str(RUN_DIR / "user"))
        if models_dir is not None:
            _move_models_dir(folder_paths, Path(models_dir).absolute())
        if output_dir is not None:
            folder_paths.set_output_directory(str(Path(output_dir).resolve()))
        for d in (folder_paths.get_output_directory(), folder_paths.get_input_directory()):
            os.makedirs(d, exist_ok=True)
        import comfy.model_management  # noqa: F401  (before nodes: reads args)
        import utils.extra_config  # ComfyUI's utils package
        import nodes

        extra = comfy_path / "extra_model_paths.yaml"
        if base is None and extra.is_file():  # as ComfyUI's main.py does
            utils.extra_config.load_extra_path_config(str(extra))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=pack, init_api_nodes=False))
    finally:
        root.setLevel(level)
    missing = [n for n in NODE_IDS if n not in nodes.NODE_CLASS_MAPPINGS]
    if pack and missing:
        raise RuntimeError(f"this pack did not load into ComfyUI at {comfy_path} (nodes missing: {missing}); "
                           "its log above says why")
    _STARTED.update(how)
    return nodes


def pack(module: str):
    """The pack's module as ComfyUI imported it (from custom_nodes/, under the pack's folder name), e.g.
    pack("nodes.comfy.loading")."""
    found = [m for n, m in sys.modules.items() if n.endswith(f"{location.PACK}." + module)]
    assert found, f"the pack's {module} is not loaded"
    return found[0]


def dit_handle(dit, variant: str, name: str = "tiny"):
    """A DiT handle as PixArt-Σ DiT Loader makes one: the pack's ModelPatcher around the diffusers model, on the CPU.
    The model is wrapped in place (ComfyUI's cast-weights layers): give a copy to keep the original as it was."""
    import torch

    cpu = torch.device("cpu")
    loading, types, variants = pack("nodes.comfy.loading"), pack("nodes.types"), pack("pixart_core.variants")
    return types.DiTHandle(loading.wrap(dit, cpu, cpu), variants.PRESETS[variant], f"{name}-{variant}", "test")


def clear_embeddings(comfy=None) -> None:
    """Empty the pack's module-level embedding cache (nodes.text.EMBEDDINGS) as ComfyUI loaded it."""
    mods = [m for name, m in sys.modules.items() if name.endswith(f"{location.PACK}.nodes.text")]
    assert mods, "the pack's nodes.text module is not loaded"
    for m in mods:
        m.EMBEDDINGS.clear()


def error_text(result: dict) -> str:
    """An Executor.run result's error and validation errors as one string (for assertions on messages)."""
    return f"{result.get('error')} {result.get('node_errors', '')}"


def run_capped(executor: "Executor", prompts: list[dict], headroom_mib: int = 750) -> list[dict]:
    """Run prompts with this process's address space capped `headroom_mib` above its size now (RLIMIT_AS), so
    that a large allocation really fails with an out-of-memory error; the cap is lifted afterwards."""
    import resource

    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom_mib * 2**20, hard))
    try:
        return [executor.run(p) for p in prompts]
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _move_base(folder_paths, base: Path) -> None:
    """ComfyUI's models/, output/, input/, temp/ and user/ folders moved to another base directory's."""
    _move_models_dir(folder_paths, base / "models")
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.filename_list_cache.clear()


def _move_models_dir(folder_paths, models: Path) -> None:
    old = folder_paths.models_dir
    for key, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        new = [str(models / os.path.relpath(p, old)) if p.startswith(old + os.sep) else p for p in paths]
        folder_paths.folder_names_and_paths[key] = (new, exts)
    folder_paths.models_dir = str(models)


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


class EventSink:
    """What ComfyUI's PromptExecutor reports to (the HTTP server, in ComfyUI itself): records the messages and
    remembers the node that is running."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.node: str | None = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        if event == "executing" and isinstance(data, dict):
            self.node = data.get("node")

    def queue_updated(self):
        pass


class Executor:
    """API-format prompts through ComfyUI's own validation and PromptExecutor, as its server's worker runs them.

    on_progress(value, total, preview, node_id): ComfyUI's progress-bar hook (node_id None: the running node,
    `self.sink.node`); on_node(node_id, class_type, seconds, cpu_seconds): after each node's execution."""

    def __init__(self, on_progress: Callable | None = None,
                 on_node: Callable[[str, str, float, float], None] | None = None, client_id: str = "harness"):
        import execution

        self.sink = EventSink()
        self.executor = execution.PromptExecutor(self.sink, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self.on_progress, self.on_node, self.client_id = on_progress, on_node, client_id

    def run(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """{'ok', 'valid': whether it passed validation, 'outputs': ui outputs by node, 'error': the validation error or the execution_error /
        execution_interrupted message, 'node_errors': validation errors by node, 'messages': the executor's status
        messages, 'seconds': execution time}."""
        import comfy.utils
        import execution

        pid = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            return {"ok": False, "valid": False, "outputs": {}, "error": valid[1], "node_errors": valid[3],
                    "messages": [], "seconds": 0.0}
        if self.on_progress is not None:
            comfy.utils.set_progress_bar_global_hook(self.on_progress)
        original = execution.get_output_data
        if self.on_node is not None:
            async def timed(prompt_id, unique_id, obj, *a, **k):
                t, c = time.perf_counter(), time.process_time()
                try:
                    return await original(prompt_id, unique_id, obj, *a, **k)
                finally:
                    self.on_node(unique_id, prompt[unique_id]["class_type"], time.perf_counter() - t,
                                 time.process_time() - c)

            execution.get_output_data = timed
        t0 = time.perf_counter()
        try:
            self.executor.execute(prompt, pid, {"client_id": self.client_id, **(extra_data or {})}, valid[2])
        finally:
            execution.get_output_data = original
            if self.on_progress is not None:
                comfy.utils.set_progress_bar_global_hook(None)
        ex = self.executor
        errors = [d for e, d in ex.status_messages if e in ("execution_error", "execution_interrupted")]
        return {"ok": ex.success, "valid": True, "outputs": ex.history_result.get("outputs", {}), "error": errors[0] if errors else None,
                "node_errors": {}, "messages": ex.status_messages, "seconds": time.perf_counter() - t0}


def validation_message(error, node_errors: dict, prompt: dict) -> str:
    """One line from ComfyUI's validate_prompt result (or a /prompt 400 answer)."""
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
    """One line from an execution_error / execution_interrupted message."""
    if "exception_message" not in err:  # execution_interrupted
        return f"interrupted at node {err.get('node_id')} ({err.get('node_type')})"
    msg = " ".join(str(err["exception_message"]).split())
    return f"node {err.get('node_id')} ({err.get('node_type')}) failed: {err.get('exception_type', 'Error')}: {msg}"

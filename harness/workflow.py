"""The ComfyUI workflow format: UI format -> API format as the frontend's graphToPrompt does, command-line style
overrides, and the model files a workflow names."""
from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # frontend-only: never sent to the server
MUTED, BYPASSED = 2, 4  # LiteGraph node modes (NEVER, BYPASS)
MODEL_INPUTS = {  # (class_type, input) -> model kind
    ("PixArtSigmaT5Loader", "t5_name"): "t5",
    ("PixArtSigmaDiTLoader", "dit_name"): "dit",
    ("PixArtSigmaVAELoader", "vae_name"): "vae",
    ("VAELoader", "vae_name"): "vae",
    ("PixArtSigmaLoraLoader", "lora_name"): "lora",
    ("PixArtSigmaControlNetLoader", "controlnet_name"): "controlnet",
}
OVERRIDABLE = ("positive", "negative", "seed", "steps", "width", "height")


class WorkflowError(Exception):
    """A workflow that cannot be converted or changed as asked; the message says why."""


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


def load_workflow(path: Path) -> dict:
    """A UI- or API-format workflow from a JSON file."""
    try:
        workflow = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WorkflowError("no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkflowError(f"not a JSON workflow ({e})") from None
    if not isinstance(workflow, dict) or not ("nodes" in workflow or is_api_format(workflow)):
        raise WorkflowError("neither a UI-format nor an API-format ComfyUI workflow")
    return workflow


def types_match(a, b) -> bool:
    """LiteGraph.isValidConnection: '*' or '' matches anything; comma lists match if any member does."""
    a, b = (0 if t in ("", "*") else t for t in (a, b))
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(types_match(x, y) for x in a.split(",") for y in b.split(","))


def bypass_input(node: dict, slot: int, wanted) -> int | None:
    """The input a bypassed node passes to its output `slot` when an input of type `wanted` asks for it, as the
    frontend's ExecutableNodeDTO.resolveOutput does: the input at the same index if its type fits both, else the
    first input of exactly that type, else the first that fits both; None when none does."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else None
    if wanted in ("*", ""):
        return slot if len(inputs) > slot else 0
    if slot < len(inputs) and types_match(inputs[slot].get("type"), out_type) and types_match(inputs[slot].get("type"), wanted):
        return slot
    exact = next((i for i, x in enumerate(inputs) if x.get("type") == wanted), None)
    if exact is not None:
        return exact
    return next((i for i, x in enumerate(inputs)
                 if types_match(x.get("type"), out_type) and types_match(x.get("type"), wanted)), None)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt as the frontend's graphToPrompt does: widget values in
    input order (skipping the control_after_generate value after a seed), links, muted nodes dropped with the
    inputs they fed, bypassed nodes passing the matching input through, Reroute nodes followed to their source,
    Note and PrimitiveNode left out (a primitive's value is already in the target's widgets_values)."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("this workflow uses subgraphs, which the headless runner does not convert; "
                            "export it in API format from ComfyUI (Workflow > Export (API)) and run that file")
    nodes_by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(link_id, wanted, seen=()):
        """(node id, slot) feeding this link for an input of type `wanted`; None when nothing real does."""
        link = links[link_id]
        origin = nodes_by_id.get(link[1])
        if origin is None or link_id in seen:
            return None
        seen = (*seen, link_id)
        if origin["type"] == "Reroute":
            feeding = next((i.get("link") for i in origin.get("inputs", []) if i.get("link") is not None), None)
            return None if feeding is None else source(feeding, wanted, seen)
        if origin.get("mode", 0) == BYPASSED:
            i = bypass_input(origin, link[2], wanted)
            feeding = None if i is None else origin["inputs"][i].get("link")
            return None if feeding is None else source(feeding, wanted, seen)
        if origin["type"] == "PrimitiveNode" or origin.get("mode", 0) == MUTED:
            return None
        return str(link[1]), link[2]

    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: node type {node['type']!r} is not installed in this ComfyUI "
                                "(missing node pack?)")
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", []) or list(specs)
        linked = {i["name"]: source(i["link"], i.get("type")) for i in node.get("inputs", [])
                  if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name in names:
            spec = specs[name]
            if _is_widget(spec):
                if not values and name in info["input"].get("optional", {}):
                    continue  # a widget added after the workflow was saved: ComfyUI uses its default
                if not values:
                    raise WorkflowError(f"node {node['id']} ({node['type']}): no widget value for {name!r} "
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


def _rescale_stages(inputs: dict, steps: int) -> None:
    """A staged sampler (start_step/end_step inside its schedule) keeps its share of the schedule when its steps
    change, so that chained stages still meet."""
    old = inputs.get("steps")
    if not isinstance(old, int) or old <= 0:
        return
    for key in ("start_step", "end_step"):
        v = inputs.get(key)
        if isinstance(v, int) and v < old:
            inputs[key] = round(v * steps / old)


def apply_overrides(prompt: dict, values: dict) -> None:
    """Set the prompts (`positive`/`negative`, on PixArt Text Encode nodes) and `seed`, `steps`, `width`, `height`
    wherever a node has that input as a plain value (not linked); None leaves an input alone. A value no node
    takes raises WorkflowError naming the input."""
    for name, value in values.items():
        if value is None:
            continue
        hit = False
        for node in prompt.values():
            if name in ("positive", "negative") and node["class_type"] != "PixArtSigmaTextEncode":
                continue
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                if name == "steps":
                    _rescale_stages(node["inputs"], value)
                node["inputs"][name] = value
                hit = True
        if not hit:
            raise WorkflowError(name)


def set_input_image(prompt: dict, name: str) -> None:
    """Point every Load Image node at an image (a name in ComfyUI's input folder)."""
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    if not loaders:
        raise WorkflowError("--image: this workflow has no Load Image node")
    for n in loaders:
        n["inputs"]["image"] = name


def model_references(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(node id, input, kind, value) for every model file the workflow names."""
    refs = []
    for nid, node in prompt.items():
        for (cls, name), kind in MODEL_INPUTS.items():
            value = node["inputs"].get(name)
            if node["class_type"] == cls and isinstance(value, str):
                refs.append((nid, name, kind, value))
    return refs


def comfy_vae_names(prompt: dict) -> set[str]:
    """The VAE names ComfyUI's own VAELoader loads in this prompt."""
    return {v for nid, _, _, v in model_references(prompt) if prompt[nid]["class_type"] == "VAELoader"}


def missing_models(prompt: dict, object_info: dict) -> list[tuple[str, str, str, str]]:
    """The model references whose value is not among the loader's choices (the file is not in models/)."""
    out = []
    for nid, name, kind, value in model_references(prompt):
        info = object_info[prompt[nid]["class_type"]]["input"]
        spec = {**info.get("required", {}), **info.get("optional", {})}[name]
        if value not in (combo_options(spec) or []):
            out.append((nid, name, kind, value))
    return out

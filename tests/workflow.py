"""UI-format workflow -> API-format prompt, using a ComfyUI server's /object_info as the frontend does."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert nodes, widget values (skipping control_after_generate values) and links; muted/bypassed nodes dropped."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type {node['type']} is not known to the server (missing node pack?)")
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = order.get("required", []) + order.get("optional", []) or list(specs)
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name in names:
            spec = specs[name]
            if _is_widget(spec):
                value = values.pop(0)
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate") or name in ("seed", "noise_seed") and spec[0] == "INT":
                    values.pop(0)
                inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt

"""The pack's logger names: `pixart_sigma` and its children, whatever path ComfyUI loads the pack from."""
from __future__ import annotations

ROOT = "pixart_sigma"
_FOLDERS = ("pixart_core", "nodes")  # the pack's code folders; what comes before them is where it was installed


def logger_name(module: str) -> str:
    """The logger name for a pack module (pass `__name__`): pixart_core.t5 -> pixart_sigma.t5, nodes.text ->
    pixart_sigma.nodes.text. ComfyUI imports the pack under its file-system path, which would otherwise name every
    console line (`/…/custom_nodes/pixart_sigma_nodes.pixart_core.t5`)."""
    parts = module.split(".")
    at = max((i for i, p in enumerate(parts) if p in _FOLDERS), default=None)
    if at is None:
        return ROOT
    tail = parts[at + 1:] if parts[at] == "pixart_core" else parts[at:]
    return ".".join([ROOT, *tail])

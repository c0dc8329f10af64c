"""Reach the pack's module-level embedding cache as ComfyUI loaded it (the pack is imported by path)."""
from __future__ import annotations

import sys


def clear_embeddings(comfy) -> None:
    mods = [m for name, m in sys.modules.items() if name.endswith("pixart_sigma_nodes.nodes.text")]
    assert mods, "the pack's nodes.text module is not loaded"
    for m in mods:
        m.EMBEDDINGS.clear()

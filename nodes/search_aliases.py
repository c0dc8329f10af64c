"""Search aliases for the node search box, where the running ComfyUI has them: its V3 `io.Schema` gained a
`search_aliases` field in 2026; 0.3.75's has none, and an unknown keyword would stop the pack from loading."""
from __future__ import annotations

import dataclasses

from comfy_api.v0_0_2 import io


def supported() -> bool:
    """Whether this ComfyUI's io.Schema takes `search_aliases`."""
    return any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def search_aliases(*words: str) -> dict[str, list[str]]:
    """Keyword arguments for io.Schema: `search_aliases=[words]` where ComfyUI reads them, else nothing."""
    return {"search_aliases": list(words)} if supported() else {}

"""Each node's definition as ComfyUI builds it in this process (what GET /object_info/<node> answers, without the
server) against the node's help page in web/docs/, which the frontend's help panel shows: the page's title is the
node's display name and it names every input and output the definition has. The e2e tier checks the same pages
over HTTP in the real frontend; this one runs beside the other node tests (and in the mutation run)."""
from __future__ import annotations

import pytest

from conftest import NODE_IDS, REPO

from harness import comfyui

DOCS = REPO / "web" / "docs"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_describes_the_node_comfyui_lists(comfy, node_id):
    info = comfyui.node_info(comfy, node_id)
    page = (DOCS / f"{node_id}.md").read_text()
    assert info["name"] == node_id
    assert page.startswith(f"# {info['display_name']}\n"), (info["display_name"], page.splitlines()[0])
    names = [*info["input"].get("required", {}), *info["input"].get("optional", {}), *info["output_name"]]
    assert [n for n in names if f"`{n}`" not in page] == [], node_id
    # every input the page names as an input is one the node has (a renamed or removed input leaves the page stale)
    inputs = page.split("## Input", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1] for line in inputs.splitlines() if line.startswith("- `")}
    assert listed <= set(names), (node_id, listed - set(names))

"""What the node definitions tell a user beyond inputs: a tooltip on every output (the server's /object_info
`output_tooltips`), and no search aliases where the running ComfyUI's V3 schema lacks the field (0.3.75: the pack
must still load there; tests/nodes/test_node_schemas.py gives a newer schema, which has it, the aliases)."""
from __future__ import annotations

import dataclasses

import pytest
import requests

from conftest import NODE_IDS


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return requests.get(comfy_server.url + "/object_info", timeout=60).json()


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_output_has_a_tooltip_in_object_info(object_info, node_id):
    info = object_info[node_id]
    assert len(info["output_tooltips"]) == len(info["output"]) > 0, info
    for name, tip in zip(info["output_name"], info["output_tooltips"]):
        assert isinstance(tip, str) and len(tip) > 10, (node_id, name, tip)


def _schema_fields() -> set[str]:
    from comfy_api.v0_0_2 import io

    return {f.name for f in dataclasses.fields(io.Schema)}


def test_on_a_comfyui_without_search_aliases_the_nodes_load_without_them(comfy, object_info):
    if "search_aliases" in _schema_fields():
        pytest.skip("this ComfyUI's io.Schema has search_aliases (a 2026 build): nothing to check here")
    for node_id in NODE_IDS:
        schema = comfy.NODE_CLASS_MAPPINGS[node_id].define_schema()  # builds: no unknown keyword reached it
        assert not hasattr(schema, "search_aliases")
        assert "search_aliases" not in object_info[node_id]

"""A help page for every node, where the frontend looks for it: ComfyUI serves the pack's WEB_DIRECTORY (web/) under
/extensions/<pack>/, and the frontend's node help (NodeHelpService.fetchCustomNodeHelp, frontends 1.32.9 and
1.58.1) asks for /extensions/<pack>/docs/<node id>/<locale>.md, then /extensions/<pack>/docs/<node id>.md. Each page
names every input and output the server lists for its node. In the real frontend (headless Debian chromium), on
the frontend ComfyUI 0.3.75 ships and on the newest one: select the node, press the selection toolbox's info button,
and the panel shows the page. Screenshots in .cache/test-artifacts/frontend/."""
from __future__ import annotations

import re

import pytest
import requests

from conftest import NODE_IDS, REPO

from harness import frontend
from harness.comfyui import make_base
from harness.location import PACK
from harness.server import serve

DOCS = REPO / "web" / "docs"
ARTIFACTS = REPO / ".cache" / "test-artifacts" / "frontend"
VERSIONS = [None, frontend.NEWEST]  # None: the frontend ComfyUI 0.3.75 ships (the pinned package)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(make_base(tmp_path_factory.mktemp("help"))) as srv:  # no models: node definitions and pages only
        yield srv.url


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return requests.get(server + "/object_info", timeout=60).json()


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_is_served_where_the_frontend_asks(server, object_info, node_id):
    # the frontend takes the pack's folder from python_module ("custom_nodes.<pack>") and asks for <node id>.md
    assert object_info[node_id]["python_module"] == f"custom_nodes.{PACK}"
    r = requests.get(f"{server}/extensions/{PACK}/docs/{node_id}.md", timeout=30)
    # 1.58.1 takes a text/html answer for its SPA fallback page and shows the description instead
    assert r.status_code == 200 and "text/html" not in r.headers["content-type"], (r.status_code, r.headers)
    assert r.content == (DOCS / f"{node_id}.md").read_bytes()


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_names_every_input_and_output(object_info, node_id):
    info = object_info[node_id]
    page = (DOCS / f"{node_id}.md").read_text()
    inputs = [*info["input"].get("required", {}), *info["input"].get("optional", {})]
    names = inputs + list(info["output_name"])
    assert [n for n in names if f"`{n}`" not in page] == [], page
    assert page.startswith(f"# {info['display_name']}\n")
    for heading in ("## Input", "## Output", "## Files", "## What goes wrong"):
        assert heading in page, (node_id, heading)


def test_web_folder_holds_no_script_for_the_frontend_to_load(server):
    """The frontend loads every .js ComfyUI lists under /extensions as an extension: web/ must have none."""
    assert sorted(p.suffix for p in (REPO / "web").rglob("*") if p.is_file()) == [".md"] * len(NODE_IDS)
    scripts = requests.get(server + "/extensions", timeout=30).json()
    assert [s for s in scripts if s.startswith(f"/extensions/{PACK}/")] == []


def first_sentence(node_id: str) -> str:
    """The page's first paragraph as the frontend renders it to text (inline markup dropped), up to 60 chars."""
    text = (DOCS / f"{node_id}.md").read_text().split("\n\n")[1]
    plain = re.sub(r"[`*]", "", " ".join(text.split()))
    return plain[:60]


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"frontend-{v or 'pinned'}")
def browser(request, tmp_path_factory):
    frontend.require_chromium()
    base = make_base(tmp_path_factory.mktemp("help_frontend"))
    with serve(base, extra_args=frontend.server_args(request.param)) as srv, frontend.Frontend(srv.url) as fe:
        fe.version = fe.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        fe.fetched = []
        fe.page.on("response", lambda r: fe.fetched.append((r.url.split("/extensions/", 1)[1], r.status))
                   if "/docs/" in r.url and "/extensions/" in r.url else None)
        yield fe


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_panel_shows_the_nodes_page(browser, node_id):
    page = browser.page
    page.evaluate("""(type) => { app.graph.clear(); const n = LiteGraph.createNode(type); n.pos = [500, 300];
        app.graph.add(n); app.canvas.deselectAll?.(); app.canvas.selectNode(n); app.canvas.setDirty(true, true); }""",
                  node_id)
    page.locator('[data-testid="info-button"]').first.click()  # the selection toolbox's info button
    # "What goes wrong" is only on the page: without it the panel falls back to the node's description
    page.get_by_role("heading", name="What goes wrong").first.wait_for(timeout=30_000)
    page.get_by_text(first_sentence(node_id)).first.wait_for(timeout=10_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"help-{browser.version}-{node_id}.png"))
    assert (f"{PACK}/docs/{node_id}.md", 200) in browser.fetched

"""The example workflows in the real ComfyUI frontend's template browser (headless Debian chromium), on the frontend
ComfyUI 0.3.75 ships and on the newest one (harness.frontend.NEWEST, served with --front-end-root): every one of
the pack's templates shows its thumbnail. Screenshots in .cache/test-artifacts/frontend/."""
from __future__ import annotations

import time
from importlib import metadata

import pytest
from PIL import Image

from conftest import EXAMPLES, REPO

from harness import frontend
from harness.comfyui import make_base
from harness.location import PACK
from harness.server import serve

ARTIFACTS = REPO / ".cache" / "test-artifacts" / "frontend"
VERSIONS = [None, frontend.NEWEST]  # None: the frontend ComfyUI 0.3.75 ships (the pinned package)

# For each template name, the natural sizes of the loaded <img>s with that alt text (none while loading or broken).
_THUMBNAILS = """(names) => Object.fromEntries(names.map(n => [n,
    [...document.querySelectorAll('img')].filter(i => i.alt === n && i.complete && i.naturalWidth > 0)
                                         .map(i => [i.naturalWidth, i.naturalHeight])]))"""


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"frontend-{v or 'pinned'}")
def browser(request, tmp_path_factory):
    frontend.require_chromium()
    base = make_base(tmp_path_factory.mktemp("templates"))  # no models: the browser lists templates only
    with serve(base, extra_args=frontend.server_args(request.param)) as srv, frontend.Frontend(srv.url) as fe:
        fe.version = fe.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        assert fe.version == (request.param or metadata.version("comfyui-frontend-package"))
        yield fe


def test_every_template_shows_its_thumbnail(browser):
    page = browser.page
    fetched: dict[str, tuple[int, str]] = {}
    prefix = f"/api/workflow_templates/{PACK}/"
    page.on("response", lambda r: fetched.__setitem__(r.url.split(prefix, 1)[1], (r.status, r.headers.get(
        "content-type", ""))) if prefix in r.url else None)
    page.evaluate("async () => await app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_role("button", name=PACK).click()  # the pack's entry under "Extensions" in the dialog's side bar
    page.get_by_text(EXAMPLES[0], exact=True).first.wait_for(timeout=30_000)
    box = page.get_by_text(EXAMPLES[0], exact=True).first.bounding_box()
    files = {n: list(Image.open(REPO / "example_workflows" / f"{n}.jpg").size) for n in EXAMPLES}
    seen: dict[str, list] = {n: [] for n in EXAMPLES}  # the sizes each card's image had

    def shown() -> dict[str, bool]:
        """Whether each card showed an image of its thumbnail's size (a missing file shows a placeholder)."""
        return {n: files[n] in sizes for n, sizes in seen.items()}

    deadline = time.time() + 60
    while time.time() < deadline:  # cards load their images as they scroll into view (and may drop them after)
        before = sum(shown().values())
        time.sleep(1)
        for name, sizes in page.evaluate(_THUMBNAILS, EXAMPLES).items():
            seen[name] += [s for s in sizes if s not in seen[name]]
        if all(shown().values()):
            break
        if sum(shown().values()) == before:  # nothing more loaded where we are: scroll on
            page.mouse.move(box["x"] + box["width"] / 2, box["y"])
            page.mouse.wheel(0, 300)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"templates-{browser.version}.png"))
    assert shown() == dict.fromkeys(EXAMPLES, True), (seen, files)
    # each thumbnail came from the URL the frontend builds for a custom node's template: <name>.jpg
    for name in EXAMPLES:
        assert fetched.get(f"{name}.jpg") == (200, "image/jpeg"), (name, fetched)

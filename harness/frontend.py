"""The real ComfyUI frontend (served by a ComfyUI server) in headless Debian chromium, driven by Playwright:
load a workflow the way a user opens one, report what the frontend could not resolve, convert it with the
frontend's own graphToPrompt(), take a screenshot. Used by tests/e2e/test_examples.py and harness/make_thumbnails.py.

Chromium comes from Debian (`apt-get install chromium`, done by scripts/test); `playwright install` is never run.
Besides the frontend ComfyUI 0.3.75 ships (the pinned comfyui-frontend-package), `static_root(NEWEST)` fetches the
newest one from PyPI once into .cache/ for `--front-end-root`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .location import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEWEST = "1.58.1"  # the newest comfyui-frontend-package on PyPI when last checked (2026-12); runs on 0.3.75
FRONTENDS = REPO / ".cache" / "frontend"  # static_root's downloads, one folder per version
# Server-side user settings: no first-run templates dialog over the canvas, a clean canvas for screenshots, and
# full-detail node drawing at the zoom that fits a whole workflow.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "Comfy.Graph.CanvasMenu": False, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}

def require_chromium() -> None:
    """Skip the calling test where Debian's chromium is missing, or fail it where scripts/test promises chromium
    (as root, or in CI)."""
    import os

    import pytest

    if not os.access(CHROMIUM, os.X_OK):
        message = f"no {CHROMIUM} (scripts/test installs Debian's chromium when run as root)"
        if os.geteuid() == 0 or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


_LOAD_AND_CHECK = """
async (wf) => {
  await app.loadGraphData(structuredClone(wf));
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const missing = [], invalid = [], roundtrip = [];
  const saved = Object.fromEntries(app.graph.serialize().nodes.map(n => [n.id, n.widgets_values ?? []]));
  const original = Object.fromEntries(wf.nodes.map(n => [n.id, n.widgets_values ?? []]));
  for (const n of nodes) {
    if (!LiteGraph.registered_node_types[n.type] || n.has_errors) missing.push(`${n.id}:${n.type}`);
    for (const w of n.widgets ?? []) {
      if (w.type === "button" || w.name.startsWith("$$") || w.computedDisabled) continue;
      const where = `${n.id}:${n.type}.${w.name}`;
      if (w.value === undefined || w.value === null) { invalid.push(`${where} has no value`); continue; }
      if (w.type === "combo") {
        let values = w.options?.values;
        if (typeof values === "function") values = values();
        if (Array.isArray(values) && !values.includes(w.value)) invalid.push(`${where}=${JSON.stringify(w.value)} is not one of ${JSON.stringify(values).slice(0, 200)}`);
      }
      if (w.type === "number" && typeof w.value === "number") {
        if (w.options?.min != null && w.value < w.options.min) invalid.push(`${where}=${w.value} < min ${w.options.min}`);
        if (w.options?.max != null && w.value > w.options.max) invalid.push(`${where}=${w.value} > max ${w.options.max}`);
      }
    }
    if (JSON.stringify(saved[n.id]) !== JSON.stringify(original[n.id]))
      roundtrip.push(`${n.id}:${n.type} saved as ${JSON.stringify(saved[n.id])}, file has ${JSON.stringify(original[n.id])}`);
  }
  return {nodes: nodes.length, links: Object.keys(app.graph.links ?? {}).length, missing, invalid, roundtrip};
}
"""


def static_root(version: str) -> Path:
    """The static folder of comfyui-frontend-package==version (for ComfyUI's --front-end-root), fetched from PyPI
    with pip into .cache/frontend/<version>/ the first time."""
    root = FRONTENDS / version
    static = root / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        f"comfyui-frontend-package=={version}", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("comfyui_frontend_package-*.whl"))
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)  # a half-written earlier try
        shutil.move(unpacked, root)
    if not (static / "index.html").is_file():
        raise RuntimeError(f"comfyui-frontend-package=={version} has no comfyui_frontend_package/static/index.html")
    return static


def server_args(version: str | None) -> tuple[str, ...]:
    """ComfyUI arguments that serve frontend `version` (None: the pinned package ComfyUI 0.3.75 ships)."""
    return () if version is None else ("--front-end-root", str(static_root(version)))


def apply_settings(url: str) -> None:
    import requests

    for key, value in SETTINGS.items():
        requests.post(f"{url}/settings/{key}", json=value, timeout=30).raise_for_status()


class Frontend:
    """One chromium page on the ComfyUI frontend at `url`."""

    def __init__(self, url: str, viewport: tuple[int, int] = (1600, 900), timeout_ms: int = 90_000):
        from playwright.sync_api import sync_playwright

        apply_settings(url)
        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            self.page = self.browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            self.errors: list[str] = []
            self.page.on("pageerror", lambda e: self.errors.append(str(e)))
            self.page.goto(url)
            self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                                        "window.app.extensionManager", timeout=timeout_ms)
        except BaseException:
            self._pw.stop()
            raise

    def load(self, workflow: dict) -> dict:
        """Open a UI-format workflow with app.loadGraphData; what the frontend could not resolve:
        {nodes, links, missing: [node types], invalid: [widget values], roundtrip: [widgets saved differently]}."""
        return self.page.evaluate(_LOAD_AND_CHECK, workflow)

    def to_prompt(self) -> dict:
        """The API-format prompt the frontend would queue (app.graphToPrompt), without its _meta titles."""
        out = self.page.evaluate("async () => (await app.graphToPrompt()).output")
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in out.items()}

    def screenshot(self, path: Path, max_width: int | None = None) -> Path:
        """The whole workflow fitted to the page (focus mode: canvas only), cropped to the nodes; PNG or JPEG by the
        path's suffix."""
        from PIL import Image

        box = self.page.evaluate("""async () => {
            if (!app.extensionManager.focusMode) await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
            await app.extensionManager.command.execute('Comfy.Canvas.FitView');
            app.canvas.setDirty(true, true);
            await new Promise(r => setTimeout(r, 300));
            const title = LiteGraph.NODE_TITLE_HEIGHT, badge = 24;
            const nodes = app.graph.nodes ?? app.graph._nodes;
            const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title - badge));
            const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
            const {scale, offset} = app.canvas.ds, r = window.devicePixelRatio || 1;
            return [(x0 + offset[0]) * scale * r, (y0 + offset[1]) * scale * r, (x1 + offset[0]) * scale * r, (y1 + offset[1]) * scale * r];
        }""")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        img = Image.open(path).convert("RGB")
        m = 16
        img = img.crop((max(int(box[0]) - m, 0), max(int(box[1]) - m, 0),
                        min(int(box[2]) + m, img.width), min(int(box[3]) + m, img.height)))
        if max_width and img.width > max_width:
            img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
        jpeg = path.suffix.lower() in (".jpg", ".jpeg")
        img.save(path, optimize=True, **({"quality": 85, "progressive": True} if jpeg else {}))
        return path

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

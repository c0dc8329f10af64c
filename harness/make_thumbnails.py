"""Writes example_workflows/<name>.jpg: each example workflow as the real ComfyUI frontend shows it (a ComfyUI
server with this pack and tiny stand-in models under the official names, headless Debian chromium). JPEG because
the frontend's template browser asks for `/api/workflow_templates/<pack>/<name>.jpg` (frontends 1.32.9 to 1.58.1).

    ./scripts/harness make_thumbnails [name ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import frontend, server, standins
from .location import REPO

EXAMPLES = REPO / "example_workflows"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="example names (default: every example_workflows/*.json)")
    p.add_argument("--width", type=int, default=800, help="thumbnail width in pixels")
    opts = p.parse_args(argv)
    paths = [EXAMPLES / f"{n}.json" for n in opts.names] or sorted(EXAMPLES.glob("*.json"))
    with tempfile.TemporaryDirectory() as tmp:
        base = standins.example_base(Path(tmp))
        with server.serve(base) as srv, frontend.Frontend(srv.url) as fe:
            for path in paths:
                report = fe.load(json.loads(path.read_text()))
                if report["missing"] or report["invalid"]:
                    print(f"{path.name}: the frontend reports {report}", file=sys.stderr)
                    return 1
                out = fe.screenshot(path.with_suffix(".jpg"), max_width=opts.width)
                print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

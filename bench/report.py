"""Statistics, the machine's description, tables and result files of the bench scripts."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.location import REPO, comfyui_path

from .measure import log


def rotations(names: list[str], repeats: int) -> list[list[str]]:
    """Run order per repeat: rotated, so no system always runs first (cold caches) or after the same one."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import transformers

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "comfyui": comfyui_path().resolve().name,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_at_start": os.getloadavg(),
            "git_head": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_measured_code": git("status", "--porcelain", "pixart_core", "nodes").splitlines()}


def gib(b: float) -> float:
    return b / 2**30


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    log(f"wrote {path}")


def publish(result: dict, markdown: str, out: Path, show: bool = True) -> None:
    """A bench script's end: its tables into result["markdown"] (printed unless shown already) and the JSON file."""
    result["markdown"] = markdown
    if show:
        print(markdown, flush=True)
    write_json(Path(out), result)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def loadavg() -> float:
    return os.getloadavg()[0]


def print_table(title: str, columns: list[tuple[str, int, str]], rows: list[dict]) -> None:
    """A fixed-width table on stdout: columns are (header, width, format string over a row's keys)."""
    print(title)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(columns)))
    for r in rows:
        print("".join(f"{fmt.format(**r):<{w}}" if i == 0 else f"{fmt.format(**r):>{w}}"
                      for i, (_, w, fmt) in enumerate(columns)))

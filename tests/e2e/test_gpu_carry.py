"""The carry for the lent GPU machine (bench/gpu_carry.py) and its rehearsal on this CPU.

The fast tests check the three things the carry does by itself: a pruned wheel is still a wheel pip installs
(PEP 427: RECORD lists every file with its sha256), the Requires-Dist check applies PEP 508 (markers, extras,
versions) against the machine's package list, and the PyAV stand-in satisfies ComfyUI's own import-time uses of
av. The dry run (bench/gpu_check_dry_run.sh: a Python 3.12 venv with torch 2.11.0 and transformers 5.17.0, the
carry installed from its wheels, every part of bench/gpu_check on the CPU) downloads ~4 GB of CUDA wheels on first
use and takes ~6 minutes after that: it runs only when GPU_CHECK_DRY_RUN=1.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu_carry
from harness.location import REPO, child_env, comfyui_path


def _wheel(folder: Path, name: str, version: str, files: dict[str, bytes], requires: list[str] = ()) -> Path:
    """A wheel as PEP 427 describes it: the files, WHEEL and METADATA in <name>-<version>.dist-info, and RECORD
    with each file's urlsafe-base64 sha256 and size."""
    info = f"{name}-{version}.dist-info"
    members = dict(files)
    requirements = "".join(f"Requires-Dist: {r}\n" for r in requires)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{requirements}\n".encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in members.items()] + [f"{info}/RECORD,,"]
    members[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    return path


def test_pruned_wheel_keeps_a_valid_record_and_installs(tmp_path):
    keep, drop = b"\x7fELF keep" * 100, b"\x7fELF drop" * 1000
    wheel = _wheel(tmp_path, "demo", "1.0", {"demo/__init__.py": b"X = 1\n", "demo/libdemo_cuda130.so": keep,
                                             "demo/libdemo_cuda124.so": drop})
    saved = gpu_carry.prune_wheel(wheel, lambda n: n.endswith("libdemo_cuda124.so"))
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("demo-1.0.dist-info/RECORD").decode().splitlines()
        # PEP 427: every file but RECORD itself is listed with its hash and size, and nothing else is listed
        listed = {}
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            listed[path] = (digest, size)
        assert set(listed) == names
        for n in names - {"demo-1.0.dist-info/RECORD"}:
            data = z.read(n)
            assert listed[n] == (f"sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}",
                                 str(len(data)))
    assert "demo/libdemo_cuda124.so" not in names and "demo/libdemo_cuda130.so" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(site), str(wheel)], check=True)
    assert (site / "demo" / "libdemo_cuda130.so").read_bytes() == keep
    assert not (site / "demo" / "libdemo_cuda124.so").exists()


def test_requirements_checked_as_pep_508_says(tmp_path):
    # What the GPU machine has (DEVICE, DEVICE_VERSIONS: torch 2.11.0, huggingface-hub 1.33.0) or the carry brings
    # meets a requirement; markers false on CPython 3.12 / Linux and extras do not apply.
    wheels = [
        _wheel(tmp_path, "carried", "0.1.2", {"carried/__init__.py": b""}),
        _wheel(tmp_path, "user", "1.0", {"user/__init__.py": b""}, requires=[
            "torch<3,>=2.4",                               # 2.11.0: met
            "huggingface-hub>=1.32.0",                     # 1.33.0: met
            "huggingface-hub>=2.0; python_version < '3.10'",  # marker false on 3.12: skipped
            "colorama; sys_platform == 'win32'",           # marker false on Linux: skipped
            "pytest; extra == 'test'",                     # an extra: skipped
            "carried>=0.1",                                # another carried wheel: met
            "importlib_metadata",                          # never imported on 3.12 (NOT_IMPORTED): skipped
        ]),
    ]
    assert gpu_carry.unmet_on_device(wheels) == []
    bad = [_wheel(tmp_path, "bad", "1.0", {"bad/__init__.py": b""}, requires=[
        "lazy-importer>=0.1; python_version < '3.15'",  # applies on 3.12, not on the machine, not carried
        "tokenizers>=0.30",                             # the machine has 0.23.2
        "trampoline"])]                                 # not on the machine, not carried here
    problems = gpu_carry.unmet_on_device(bad)
    assert len(problems) == 3, problems
    assert any("lazy-importer" in p for p in problems) and any("0.23.2" in p for p in problems)


def test_av_standin_covers_comfyui_imports(tmp_path):
    """ComfyUI's API package (which this pack's nodes import) and its video/audio node files import av at
    start-up; with the stand-in first on the path they import, and any use of av says what it is."""
    (tmp_path / "av").mkdir()
    shutil.copy(REPO / "bench" / "gpu_check_av_standin.py", tmp_path / "av" / "__init__.py")
    code = """
import sys
from comfy.cli_args import args
args.cpu = True
import av
assert av.STANDIN, av.__file__
import comfy_api.latest
from comfy_api.latest import io, ui, InputImpl
import importlib.util
for name in ("nodes_video", "nodes_lt"):
    spec = importlib.util.spec_from_file_location(name, sys.argv[1] + f"/comfy_extras/{name}.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
try:
    av.open("clip.mp4")
except RuntimeError as e:
    print("RAISED", e)
"""
    env = child_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-c", code, str(comfyui_path())], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAISED PyAV is not installed" in r.stdout and "gpu_check_av_standin.py" in r.stdout


@pytest.mark.skipif(os.environ.get("GPU_CHECK_DRY_RUN") != "1",
                    reason="the GPU machine's run rehearsed on the CPU: set GPU_CHECK_DRY_RUN=1 (~4 GB download once, "
                           "~6 min)")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check_dry_run.sh"), "--out", str(out)],
                       capture_output=True, text=True, timeout=3000, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert {n: p["status"] for n, p in data["parts"].items()} == {n: "ok" for n in data["parts"]}
    assert data["machine"]["python"].startswith("3.12.") and data["machine"]["torch"].startswith("2.11.0")
    assert data["machine"]["transformers"] == "5.17.0" and data["weights"]["bitsandbytes_library"] == [
        "libbitsandbytes_cpu.so"]
    assert "gpu_check_dry_run: passed" in r.stdout

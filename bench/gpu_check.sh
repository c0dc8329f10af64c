#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the pack's nodes inside ComfyUI on one NVIDIA GPU, < 8 min; --cpu-smoke runs
# every code path on the CPU. PYTHON picks the interpreter (default the project's .venv); ComfyUI comes first on
# the import path (.cache/comfyui, which harness.location points at $COMFYUI_PATH or the fetched copy).
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD/.cache/comfyui:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 \
  exec "${PYTHON:-.venv/bin/python}" -m bench.gpu_check "$@"

#!/usr/bin/env bash
# Peak VRAM of a 1024 px PixArt-Σ image through ComfyUI's model management vs diffusers' 8-bit recipe (NVIDIA GPU).
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD/.cache/comfyui:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 \
  exec "${PYTHON:-.venv/bin/python}" -m bench.gpu_memory "$@"

#!/usr/bin/env bash
# P4: PixArt-Σ 1024 px, 20 steps on an NVIDIA GPU: ours vs diffusers, bf16/fp16, with and without torch.compile.
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD/.cache/comfyui:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 \
  exec "${PYTHON:-.venv/bin/python}" -m bench.gpu "$@"

#!/usr/bin/env bash
# The GPU check (issue 11): 8-bit T5 reload peak, 1024 px under 12/8/6 GiB caps (T5 8-bit / nf4), P4 against
# diffusers, SDPA kernels, quantized T5 cosine,
# the 1024 -> 2K -> 4K-tiled DiT forwards (issue 16). One NVIDIA GPU, < 8 min. --cpu-smoke runs it on the CPU.
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD/.cache/comfyui:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 \
  exec "${PYTHON:-.venv/bin/python}" -m bench.gpu_check "$@"

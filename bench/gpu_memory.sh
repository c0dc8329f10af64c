#!/usr/bin/env bash
# Peak VRAM of a 1024 px PixArt-Σ image through ComfyUI's model management vs diffusers' 8-bit recipe (NVIDIA GPU).
exec "$(dirname "$0")/../scripts/harness" bench.gpu_memory "$@"

#!/usr/bin/env bash
# P4: PixArt-Σ 1024 px, 20 steps on an NVIDIA GPU: ours vs diffusers, bf16/fp16, with and without torch.compile.
exec "$(dirname "$0")/../scripts/harness" bench.gpu "$@"

#!/usr/bin/env bash
# The GPU check on the lent GPU machine, from the carry (.gpu_carry, built here by `python3 bench/gpu_carry.py
# build`): installs its wheels with pip --no-index --no-deps into $GPU_SITE (default /tmp/gpu_site), adds the
# av stand-in where the machine has no PyAV, checks every carried wheel's requirements, then runs
# bench/gpu_check.sh with that folder and the carried ComfyUI. PYTHON picks the interpreter (default python3: the
# machine's, with its torch); arguments go to bench/gpu_check.py. bench/gpu_check_dry_run.sh runs the same on
# this CPU in a venv with the machine's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/gpu_site}
"$py" bench/gpu_carry.py install --carry .gpu_carry --site "$site"
PYTHON="$py" PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" COMFYUI_PATH="$PWD/.gpu_carry/comfyui" \
  PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 exec bash bench/gpu_check.sh "$@"

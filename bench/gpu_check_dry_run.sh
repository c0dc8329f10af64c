#!/usr/bin/env bash
# The GPU machine's run rehearsed on this CPU: the same carry (.gpu_carry; built first if missing), installed by
# the same script (bench/gpu_check_device.sh) into a fresh folder, in a venv that has only the machine's own
# packages at its versions (Python 3.12, torch 2.11.0, transformers 5.17.0: bench/gpu_check_device_requirements.txt),
# then bench/gpu_check.py --cpu-smoke: every part's code path with tiny models on the CPU.
#
#   bash bench/gpu_check_dry_run.sh [gpu_check args]    # e.g. --parts a,b
#
# The venv lives in .cache/gpu-dry-run/venv (made once: ~4 GB of CUDA wheels from PyPI, a few minutes; again when
# the requirements file changes). Writes bench/out/gpu_check_dry_run.json unless --out is given. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cache/gpu-dry-run
venv=$dir/venv
reqs=bench/gpu_check_device_requirements.txt
if ! cmp -s "$reqs" "$venv/device-requirements.txt" 2>/dev/null; then
  py312=$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
  [ -n "$py312" ] || { echo "gpu_check_dry_run: no python3.12 here (the GPU machine's Python); install one" >&2; exit 2; }
  rm -rf "$venv"
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
  # transformers' CLI (typer) pulls pydantic here; the machine has none, and ComfyUI reads pyproject.toml with it
  # when it is there: remove it, so the rehearsal sees what the machine sees.
  "$venv/bin/python" -m pip uninstall --quiet --yes pydantic pydantic-core
  cp "$reqs" "$venv/device-requirements.txt"
fi
[ -f .gpu_carry/manifest.json ] || python3 bench/gpu_carry.py build
site=$(mktemp -d /tmp/gpu_site.XXXXXX)
trap 'rm -rf "$site"' EXIT
out=()
case " $* " in *" --out "*) ;; *) out=(--out bench/out/gpu_check_dry_run.json) ;; esac
start=$(date +%s)
PYTHON="$PWD/$venv/bin/python" GPU_SITE="$site" bash bench/gpu_check_device.sh --cpu-smoke "${out[@]}" "$@"
echo "gpu_check_dry_run: passed in $(( $(date +%s) - start )) s (install from the carry + every part on the CPU)"

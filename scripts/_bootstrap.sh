# Sourced by the commands in scripts/ (not run on its own): puts what the project needs into ./.venv (once; again
# when requirements-test.txt changes), makes ComfyUI ready (harness/location.py: $COMFYUI_PATH, else ComfyUI 0.3.75
# fetched into .cache/) and sets the import path the tooling uses: ComfyUI first, then this checkout (never the
# current directory: a checkout's nodes/ would hide ComfyUI's nodes.py).
# Sets: root, venv, COMFYUI_PATH (exported), pypath (the PYTHONPATH for `python -m harness...`; pytest has its
# own, from pyproject.toml).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${PIXART_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
_say() { echo "[$(basename "$0")] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  _say "creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.requirements-test.sha"
want=$(sha256sum "$root/requirements-test.txt" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  _say "installing requirements-test.txt (first run: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements-test.txt"
  echo "$want" > "$stamp"
fi

COMFYUI_PATH=$(cd "$root" && "$venv/bin/python" -m harness.location)
export COMFYUI_PATH
pypath="$root/.cache/comfyui:$root${PYTHONPATH:+:$PYTHONPATH}"  # then what the caller had

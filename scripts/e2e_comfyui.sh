#!/usr/bin/env bash
# End-to-end check of the ComfyUI pack on a real ComfyUI, headless on the CPU (127.0.0.1 only).
#
# usage: scripts/e2e_comfyui.sh [pytest args...]
#   COMFYUI_DIR      ComfyUI checkout                 (default: /work/ext/ComfyUI)
#   IMMISCIBLE_VENV  python that runs ComfyUI         (default: /work/ext/venv/bin/python)
#   IMMISCIBLE_CKPT  random SD1.5 checkpoint          (default: $IMMISCIBLE_CACHE or /work/ext/cache/sd15_random.safetensors)
#   IMMISCIBLE_ARTIFACTS  keep the sheets, sampled images and the server log here (default: build/e2e_comfyui)
# Runs the nodes' tests and the Train LoRA (Immiscible) tests (three fresh servers, about 12-15 min more).
# Set the environment up once with scripts/setup_integration.sh. The server holds
# `flock /tmp/immiscible-heavy.lock` while it runs (about 6.5 GB with the model loaded).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export COMFYUI_DIR=${COMFYUI_DIR:-/work/ext/ComfyUI}
export IMMISCIBLE_VENV=${IMMISCIBLE_VENV:-/work/ext/venv/bin/python}
export IMMISCIBLE_ARTIFACTS=${IMMISCIBLE_ARTIFACTS:-$repo/build/e2e_comfyui}
py=$repo/.venv/bin/python
[ -x "$py" ] || py=$IMMISCIBLE_VENV
ver=$(sed -n "s/^__version__ = \"\(.*\)\"/\1/p" "$COMFYUI_DIR/comfyui_version.py" 2>/dev/null || true)
rev=$(git -C "$COMFYUI_DIR" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
echo "[e2e_comfyui] ComfyUI ${ver:-?} ($rev) at $COMFYUI_DIR"
cd "$repo"
exec "$py" -m pytest tests/integration/test_comfyui.py tests/integration/test_comfyui_train.py -v -s -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up the integration-test environment: one venv that runs the real kohya-ss/sd-scripts and
# ComfyUI on the CPU, an offline CLIP tokenizer, a random-weight SD1.5 checkpoint and 4 tiny
# training images. Idempotent: every step is skipped when its output is already there.
#
# usage: scripts/setup_integration.sh [EXT_DIR]
#   EXT_DIR        default: ${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}
#   SD_SCRIPTS_DIR checkout of kohya-ss/sd-scripts   (default: EXT_DIR/sd-scripts)
#   COMFYUI_DIR    checkout of ComfyUI               (default: EXT_DIR/ComfyUI)
#   PYTHON         interpreter used to create the venv (default: python3)
# Neither checkout is fetched here; make them first (e.g. fetch + /work/shared/tools/checkout-snapshot.sh,
# or git clone) outside this repository.
#
# Creates:  EXT_DIR/venv                          (~6.5 GB: torch, sd-scripts + ComfyUI requirements)
#           EXT_DIR/cache/tokenizer/openai_clip-vit-large-patch14/
#           EXT_DIR/cache/sd15_random.safetensors (~2.1 GB, ~11 GB peak RAM while built)
#           EXT_DIR/cache/train_images/{000..003}.png + .txt  (64x64)
#           EXT_DIR/cache/train_images.toml       (sd-scripts --dataset_config for them; batch 2, 64 px)
# Prints `export` lines at the end (stdout); everything else goes to stderr, so
#   eval "$(scripts/setup_integration.sh /work/ext)"
# works. Memory-heavy steps run under `flock /tmp/immiscible-heavy.lock`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fixtures=$here/fixtures
EXT_DIR=${1:-${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}}
mkdir -p "$EXT_DIR"
EXT_DIR=$(cd "$EXT_DIR" && pwd)
SD_SCRIPTS_DIR=${SD_SCRIPTS_DIR:-$EXT_DIR/sd-scripts}
COMFYUI_DIR=${COMFYUI_DIR:-$EXT_DIR/ComfyUI}
VENV=$EXT_DIR/venv
PY=$VENV/bin/python
CACHE=$EXT_DIR/cache
LOCK=${IMMISCIBLE_HEAVY_LOCK:-/tmp/immiscible-heavy.lock}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

log() { echo "[setup_integration] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -f "$SD_SCRIPTS_DIR/train_network.py" ] || die "no sd-scripts checkout at $SD_SCRIPTS_DIR (set SD_SCRIPTS_DIR)"
SD_SCRIPTS_DIR=$(cd "$SD_SCRIPTS_DIR" && pwd)
if [ -f "$COMFYUI_DIR/main.py" ]; then
  COMFYUI_DIR=$(cd "$COMFYUI_DIR" && pwd)
else
  log "no ComfyUI checkout at $COMFYUI_DIR (set COMFYUI_DIR): setting up for sd-scripts only"
  COMFYUI_DIR=
fi

# ---- 1. venv ---------------------------------------------------------------------------------
marker=$VENV/.immiscible-setup-done
if [ -f "$marker" ] && [ -x "$PY" ]; then
  log "venv ready: $VENV"
else
  log "creating venv $VENV (several minutes, ~6.5 GB)"
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  pip=("$PY" -m pip --disable-pip-version-check)
  "${pip[@]}" install "${TORCH_PINS[@]}" >&2
  (cd "$SD_SCRIPTS_DIR" && "${pip[@]}" install -r requirements.txt) >&2   # ends in `-e .`
  if [ -n "$COMFYUI_DIR" ]; then "${pip[@]}" install -r "$COMFYUI_DIR/requirements.txt" requests >&2; fi
  "${pip[@]}" install numpy scipy pytest tqdm matplotlib >&2
  # triton: torch's Linux wheel normally brings its own; add it only if missing and keep it only
  # if torch still imports afterwards (TRITON_INTERPRET=1 kernel tests run on the CPU with it).
  if ! "$PY" -c "import triton" 2>/dev/null; then
    if "${pip[@]}" install triton >&2 && "$PY" -c "import torch, triton" >/dev/null 2>&1; then
      log "triton installed"
    else
      log "triton broke or failed; removing it"
      "${pip[@]}" uninstall -y triton >&2 || true
    fi
  fi
  "${pip[@]}" check >&2 || die "pip check failed in $VENV"
  "$PY" -c "import torch, torchvision, library.train_util, accelerate; print('torch', torch.__version__)" >&2 \
    || die "venv import check failed"
  date -u +%FT%TZ > "$marker"
fi

mkdir -p "$CACHE"

# ---- 2. tokenizer ----------------------------------------------------------------------------
"$PY" "$fixtures/build_tokenizer.py" "$CACHE/tokenizer" >&2

# ---- 3. random SD1.5 checkpoint (heavy) ------------------------------------------------------
CKPT=$CACHE/sd15_random.safetensors
if [ -s "$CKPT" ]; then
  log "checkpoint present: $CKPT"
else
  log "building $CKPT (~45 s, ~11 GB RAM; waiting for $LOCK)"
  flock "$LOCK" "$PY" "$fixtures/build_sd15_checkpoint.py" "$SD_SCRIPTS_DIR" "$CKPT" >&2
fi

# ---- 4. tiny training images -----------------------------------------------------------------
IMAGES=$CACHE/train_images
"$PY" - "$IMAGES" >&2 <<'PYEOF'
import os, sys
import numpy as np
from PIL import Image

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
captions = ["a red square", "a green circle", "a blue gradient", "a yellow stripe pattern"]
yy, xx = np.mgrid[0:64, 0:64]
made = 0
for i, cap in enumerate(captions):
    png, txt = os.path.join(out, f"{i:03d}.png"), os.path.join(out, f"{i:03d}.txt")
    if os.path.exists(png) and os.path.exists(txt):
        continue
    rng = np.random.default_rng(i)
    img = np.full((64, 64, 3), 32, np.uint8)
    if i == 0:
        img[16:48, 16:48] = (220, 30, 30)
    elif i == 1:
        img[(yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2] = (30, 200, 60)
    elif i == 2:
        img[..., 2] = (xx * 4).astype(np.uint8)
    else:
        img[(yy // 8) % 2 == 0] = (230, 210, 40)
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(png)
    with open(txt, "w") as f:
        f.write(cap + "\n")
    made += 1
print(f"[setup_integration] train images: {out} ({made} new)")
PYEOF
# sd-scripts' --train_data_dir wants N_name subfolders; a --dataset_config TOML takes the flat folder.
DATASET_TOML=$CACHE/train_images.toml
cat > "$DATASET_TOML.tmp" <<EOF2
[general]
caption_extension = ".txt"
resolution = 64
batch_size = 2
enable_bucket = false
shuffle_caption = false

[[datasets]]

  [[datasets.subsets]]
  image_dir = "$IMAGES"
  num_repeats = 1
EOF2
mv "$DATASET_TOML.tmp" "$DATASET_TOML"

# ---- exports ---------------------------------------------------------------------------------
cat <<EOF2
export SD_SCRIPTS_DIR=$SD_SCRIPTS_DIR
${COMFYUI_DIR:+export COMFYUI_DIR=$COMFYUI_DIR}
export IMMISCIBLE_VENV=$PY
export IMMISCIBLE_CACHE=$CACHE
EOF2

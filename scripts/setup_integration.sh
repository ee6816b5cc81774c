#!/usr/bin/env bash
# Set up the integration-test environment: one venv that runs the real kohya-ss/sd-scripts and
# ComfyUI on the CPU, an offline CLIP tokenizer, a random-weight SD1.5 checkpoint and 4 tiny
# training images. Idempotent: every step is skipped when its output is already there.
#
# usage: scripts/setup_integration.sh [EXT_DIR]
#        scripts/setup_integration.sh --matrix EXT_DIR CHECKOUT...   (one venv per distinct requirements.txt)
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

# ---- --matrix: a venv per sd-scripts requirements.txt, for several checkouts ---------------------
# EXT_DIR/matrix/base holds torch 2.14.1 + torchvision 0.29.1 once; each distinct requirements.txt
# (checkouts whose files agree share one) gets EXT_DIR/matrix/req-<sha8> layered on it with a .pth
# (a plain venv: `--system-site-packages` from a venv's python would expose the interpreter's global
# site-packages, not the base venv's), its own `pip install -r requirements.txt`, and the pack
# (install.py). NumPy 1 wheels: when `import library.train_util` fails (v0.8.7's opencv, v0.9.1's
# unpinned numpy) the install is repeated with "numpy<2" "pandas<3" (pandas 3 needs NumPy 2).
# Prints `export SD_SCRIPTS_MATRIX="CHECKOUT=PYTHON ..."` for tests/integration and e2e_sd_scripts.sh.
if [ "${1:-}" = "--matrix" ]; then
  shift
  EXT_DIR=${1:?usage: setup_integration.sh --matrix EXT_DIR CHECKOUT...}; shift
  M=$EXT_DIR/matrix; mkdir -p "$M"; BASE=$M/base
  log() { echo "[setup_integration] $*" >&2; }
  if [ ! -f "$BASE/.done" ]; then
    log "base venv $BASE: torch==2.14.1 torchvision==0.29.1"
    "${PYTHON:-python3}" -m venv "$BASE"
    "$BASE/bin/python" -m pip --disable-pip-version-check install torch==2.14.1 torchvision==0.29.1 >&2
    touch "$BASE/.done"
  fi
  base_sp=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pairs=()
  for co in "$@"; do
    co=$(cd "$co" && pwd)
    [ -f "$co/requirements.txt" ] || { log "no requirements.txt in $co"; exit 1; }
    V=$M/req-$(sha256sum "$co/requirements.txt" | cut -c1-8)
    if [ ! -f "$V/.done" ]; then
      log "venv $V for $co ($(date -u +%T))"
      [ -x "$V/bin/python" ] || "${PYTHON:-python3}" -m venv "$V"
      echo "$base_sp" > "$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_immiscible_base.pth"
      pip=("$V/bin/python" -m pip --disable-pip-version-check)
      (cd "$co" && nice -n 10 "${pip[@]}" install -r requirements.txt pytest) >&2
      if ! (cd "$co" && PYTHONPATH=$co "$V/bin/python" -c "import library.train_util, accelerate, cv2") >/dev/null 2>&1; then
        log "$co: library.train_util does not import; again with numpy<2 pandas<3"
        (cd "$co" && nice -n 10 "${pip[@]}" install -r requirements.txt "numpy<2" "pandas<3") >&2
      fi
      "${pip[@]}" check >&2 || { log "pip check failed in $V"; exit 1; }
      (cd "$co" && PYTHONPATH=$co "$V/bin/python" -c "import library.train_util, accelerate, cv2") >&2 \
        || { log "import check failed for $co in $V"; exit 1; }
      touch "$V/.done"
    fi
    "$V/bin/python" "$here/../install.py" --sd-scripts "$co" --python "$V/bin/python" >&2 \
      || { log "install.py --sd-scripts $co failed"; exit 1; }
    pairs+=("$co=$V/bin/python")
  done
  echo "export SD_SCRIPTS_MATRIX=\"${pairs[*]}\""
  exit 0
fi
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

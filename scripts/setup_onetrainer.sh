#!/usr/bin/env bash
# Set up a OneTrainer that trains on the CPU, for tests/integration/test_onetrainer.py.
# Idempotent: each step is skipped when its output is already there.
#
# usage: scripts/setup_onetrainer.sh [EXT_DIR]
#   EXT_DIR         default: ${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}
#   ONETRAINER_DIR  checkout of Nerogar/OneTrainer (default: EXT_DIR/OneTrainer); tested at 23df3832
#   OT_SRC          where the three git-pinned requirements are checked out (default: EXT_DIR/onetrainer/src):
#                   OT_SRC/diffusers (huggingface/diffusers 1ffa423), OT_SRC/mgds (Nerogar/mgds 3a6994a),
#                   OT_SRC/Muon (KellerJordan/Muon f90a42b)
#   MIRROR          optional folder of bare git snapshots named owner+name/repo (e.g. /work/.mirror); when a
#                   checkout above is missing it is made from there, else by `git clone` from GitHub
#   PYTHON          interpreter for the venv (default: python3)
# Needs EXT_DIR/cache from scripts/setup_integration.sh (sd15_random.safetensors, tokenizer, train_images).
#
# Creates:  EXT_DIR/onetrainer/venv                    (~7 GB: torch 2.14.1 + requirements-default/global)
#           EXT_DIR/cache/sd15_random_diffusers/       (the random SD1.5 checkpoint as a diffusers folder,
#                                                        OneTrainer's single-file loader needs the hub)
# Prints `export` lines at the end (stdout); logs go to stderr:  eval "$(scripts/setup_onetrainer.sh /work/ext)"
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
EXT_DIR=${1:-${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}}
mkdir -p "$EXT_DIR"; EXT_DIR=$(cd "$EXT_DIR" && pwd)
OT=${ONETRAINER_DIR:-$EXT_DIR/OneTrainer}
SRC=${OT_SRC:-$EXT_DIR/onetrainer/src}
VENV=$EXT_DIR/onetrainer/venv
PY=$VENV/bin/python
CACHE=$EXT_DIR/cache
LOCK=${IMMISCIBLE_HEAVY_LOCK:-/tmp/immiscible-heavy.lock}
log() { echo "[setup_onetrainer] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- 1. checkouts ----------------------------------------------------------------------------
checkout() {  # owner/name rev dest
  local repo=$1 rev=$2 dest=$3
  [ -n "$(ls -A "$dest" 2>/dev/null)" ] && { log "present: $dest"; return; }
  local bare=${MIRROR:+$MIRROR/${repo/\//+}/repo}
  mkdir -p "$dest"
  if [ -n "$bare" ] && [ -d "$bare" ]; then
    git --git-dir="$bare" archive "$rev" | tar -x -C "$dest"
  else
    git clone -q "https://github.com/$repo.git" "$dest" && git -C "$dest" checkout -q "$rev"
  fi
  log "checked out $repo@$rev -> $dest"
}
checkout Nerogar/OneTrainer 23df3832 "$OT"
checkout huggingface/diffusers 1ffa423 "$SRC/diffusers"
checkout Nerogar/mgds 3a6994a "$SRC/mgds"
checkout KellerJordan/Muon f90a42b "$SRC/Muon"

# ---- 2. venv ---------------------------------------------------------------------------------
marker=$VENV/.immiscible-setup-done
if [ -f "$marker" ] && [ -x "$PY" ]; then
  log "venv ready: $VENV"
else
  log "creating $VENV (several minutes, ~7 GB)"
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  pip=("$PY" -m pip --disable-pip-version-check)
  "${pip[@]}" install torch==2.14.1 torchvision==0.29.1 >&2
  # requirements-default.txt (the CPU file) + requirements-global.txt, without the torch pins (2.14.1
  # stays) and without the three git pins (installed from the local checkouts below)
  req=$EXT_DIR/onetrainer/requirements-cpu.txt
  cat "$OT/requirements-default.txt" "$OT/requirements-global.txt" \
    | grep -v -E '^(torch|torchvision)==|^-e git\+|^-r ' > "$req"
  nice -n 10 "${pip[@]}" install -r "$req" >&2
  SETUPTOOLS_SCM_PRETEND_VERSION=0.0.0 "${pip[@]}" install -e "$SRC/diffusers" -e "$SRC/mgds" -e "$SRC/Muon" >&2
  "${pip[@]}" install pytest >&2
  "$PY" -c "import torch, diffusers, mgds, transformers; print('torch', torch.__version__)" >&2 \
    || die "venv import check failed"
  date -u +%FT%TZ > "$marker"
fi

# ---- 3. the random SD1.5 checkpoint as a diffusers folder (heavy) ----------------------------
OUT=$CACHE/sd15_random_diffusers
[ -s "$CACHE/sd15_random.safetensors" ] || die "no $CACHE/sd15_random.safetensors: run scripts/setup_integration.sh first"
if [ -f "$OUT/model_index.json" ]; then
  log "diffusers folder present: $OUT"
else
  log "converting to $OUT (~20 s, ~4 GB RAM; waiting for $LOCK)"
  HF_HUB_OFFLINE=1 flock "$LOCK" "$PY" "$here/fixtures/onetrainer_sd15_to_diffusers.py" \
    "$CACHE/sd15_random.safetensors" "$CACHE/tokenizer" "$OUT" >&2
fi

cat <<EOF2
export ONETRAINER_DIR=$(cd "$OT" && pwd)
export ONETRAINER_PYTHON=$PY
export IMMISCIBLE_CACHE=$CACHE
EOF2

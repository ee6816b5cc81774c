#!/usr/bin/env bash
# End to end on the CPU: the real musubi-tuner wan_train_network.py trains a Wan 2.1 T2V LoRA for 2
# steps with --immiscible_k 8 (LoRA metadata ss_immiscible_k=8), once with the option absent and once
# as stock musubi-tuner (IMMISCIBLE_MUSUBI_DISABLE=1; must give the same LoRA bit for bit), and with
# --immiscible_k 1 (the same again). Random DiT weights; latent and T5 caches written by musubi's own
# cache writers. Prints the k=8 LoRA's path on its last line.
#
# usage: scripts/e2e_musubi_tuner.sh [OUT_DIR] [--full]
#   --full         the real Wan 2.1 T2V 1.3B layout (5.3 GiB fp32 DiT, ~2.5 min and ~8 GB per run);
#                  default: a tiny Wan (same code, dim 128, 2 layers; ~40 s per run)
#   MUSUBI_DIR     musubi-tuner checkout       (default /work/ext/musubi/musubi-tuner)
#   MUSUBI_VENV    its venv                    (default /work/ext/musubi/venv)
#   MUSUBI_FIXTURE fixture folder (built here with scripts/fixtures/musubi_make_wan_fixture.py when missing;
#                  default OUT_DIR/fixture_{tiny,1.3B})
# The CPU shim (scripts/fixtures/musubi_cpu_shim) is on PYTHONPATH for these runs only: musubi's
# wan/modules/t5.py calls torch.cuda.current_device() at import. Neither musubi nor the pack needs it on a GPU.
# Runs hold flock /tmp/immiscible-heavy.lock.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pack=$(dirname "$here")
OUT=${1:-${TMPDIR:-/tmp}/immiscible-musubi-e2e}; shift || true
FULL=0; [ "${1:-}" = --full ] && FULL=1
MUSUBI=${MUSUBI_DIR:-/work/ext/musubi/musubi-tuner}
VENV=${MUSUBI_VENV:-/work/ext/musubi/venv}
PY=$VENV/bin/python
if [ $FULL = 1 ]; then TASK=t2v-1.3B; RUNNER=(); else TASK=t2v-tiny; RUNNER=("$here/fixtures/musubi_tiny_wan.py"); fi
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
FIX=${MUSUBI_FIXTURE:-$OUT/fixture_$TASK}
export PYTHONPATH="$here/fixtures/musubi_cpu_shim:$here/fixtures${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[e2e musubi] $*" >&2; }

if [ ! -f "$FIX/dataset.toml" ] || [ ! -f "$FIX/dit_${TASK}_random_float32.safetensors" ]; then
  log "building fixture $FIX ($TASK)"
  (cd "$MUSUBI" && flock /tmp/immiscible-heavy.lock "$PY" "$here/fixtures/musubi_make_wan_fixture.py" "$FIX" \
     --dtype float32 --task "$TASK" --items 2 --batch-size 2 >&2)
fi
log "installing the pack into $VENV"
python3 "$pack/install.py" --musubi-tuner "$MUSUBI" --python "$PY" > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log" >&2; exit 1; }

run() {  # run NAME [extra args...]
  local name=$1; shift
  local dir=$OUT/$name; rm -rf "$dir"; mkdir -p "$dir"
  log "run $name: $*"
  local t0=$SECONDS
  (cd "$MUSUBI" && IMMISCIBLE_MUSUBI_DUMP="$dir/dump" flock /tmp/immiscible-heavy.lock \
     /usr/bin/time -v -o "$dir/time.txt" nice -n 10 \
     "$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
       --dynamo_backend no --num_cpu_threads_per_process 2 \
     "${RUNNER[@]}" src/musubi_tuner/wan_train_network.py \
       --task "$TASK" --dit "$FIX/dit_${TASK}_random_float32.safetensors" --dataset_config "$FIX/dataset.toml" \
       --sdpa --mixed_precision no --network_module networks.lora_wan --network_dim 4 --network_alpha 1 \
       --optimizer_type AdamW --learning_rate 1e-4 --max_train_steps 2 --max_data_loader_n_workers 0 \
       --seed 42 --timestep_sampling shift --discrete_flow_shift 3.0 \
       --output_dir "$dir" --output_name wan_lora "$@") > "$dir/log.txt" 2>&1 \
    || { tail -30 "$dir/log.txt" >&2; log "run $name FAILED"; exit 1; }
  log "run $name: ok, $((SECONDS - t0)) s, peak RSS $(awk -F': ' '/Maximum resident/ {printf "%.2f GB", $2/1048576}' "$dir/time.txt")"
}

run k8 --immiscible_k 8
run off
IMMISCIBLE_MUSUBI_DISABLE=1 run stock
run k1 --immiscible_k 1
grep -h "immiscible: k=" "$OUT/k8/log.txt" | head -1 | sed 's/^.*immiscible:/[e2e musubi] start-up: immiscible:/' >&2 || true
"$PY" "$here/fixtures/musubi_compare.py" "$OUT/k8" "$OUT/off" "$OUT/stock" "$OUT/k1" --k 8 | tee "$OUT/summary.json" >&2
echo "$OUT/k8/wan_lora.safetensors"

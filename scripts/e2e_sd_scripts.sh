#!/usr/bin/env bash
# End-to-end proof on the real kohya-ss/sd-scripts, CPU only: train_network.py trains a LoRA for
# 2 steps on a random-weight SD1.5 checkpoint with --immiscible_k 8, again with the option off,
# and once more with two CPU processes under `accelerate launch` (see the note at that run).
# The trainer is started with
# plain `python train_network.py` / `accelerate launch train_network.py`: the patches come from
# the start-up hook that install.py puts into the venv (not from kohya_patch.run).
#
# usage: scripts/e2e_sd_scripts.sh [EXT_DIR] [--repro] [--skip-multi] [--multi-only]
#        SD_SCRIPTS_MATRIX="CHECKOUT=PYTHON ..." IMMISCIBLE_CACHE=DIR scripts/e2e_sd_scripts.sh
#   EXT_DIR  where scripts/setup_integration.sh builds (or has built) the venv, tokenizer,
#            checkpoint and images; default ${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}.
#            SD_SCRIPTS_DIR / COMFYUI_DIR as for setup_integration.sh.
#   --repro       run the k=8 job twice and require identical selections and LoRA weights
#   --skip-multi  leave out the 2-process run (it needs ~14 GB of RAM)
#   --multi-only  only the 2-process run (the checks reuse the single-process runs already there)
# Runs go to EXT_DIR/cache/e2e-runs/; a summary is printed and written to summary.json there.
# With SD_SCRIPTS_MATRIX (whitespace-separated CHECKOUT=PYTHON pairs: an sd-scripts checkout and the
# venv python that runs it, e.g. from `scripts/setup_integration.sh --matrix`), the single-process
# runs (k=8, option off, stock) are made for every checkout in turn, into
# IMMISCIBLE_CACHE/e2e-matrix/<checkout name>/, and matrix.json there sums them up (wall times too).
# Each training run holds `flock /tmp/immiscible-heavy.lock` (about 7 GB RSS per process).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
EXT_DIR=${IMMISCIBLE_EXT_DIR:-$HOME/.cache/immiscible-ext}
REPRO=0
MULTI=1
SINGLE=1
for a in "$@"; do
  case $a in
    --repro) REPRO=1 ;;
    --skip-multi) MULTI=0 ;;
    --multi-only) SINGLE=0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) EXT_DIR=$a ;;
  esac
done
LOCK=${IMMISCIBLE_HEAVY_LOCK:-/tmp/immiscible-heavy.lock}
log() { echo "[e2e_sd_scripts] $*" >&2; }

# ---- the matrix: this script once per checkout -----------------------------------------------
if [ -n "${SD_SCRIPTS_MATRIX:-}" ] && [ -z "${_IMMISCIBLE_E2E_ONE:-}" ]; then
  [ -d "${IMMISCIBLE_CACHE:-}/train_images" ] || { log "SD_SCRIPTS_MATRIX needs IMMISCIBLE_CACHE (setup_integration.sh)"; exit 2; }
  out=$IMMISCIBLE_CACHE/e2e-matrix
  mkdir -p "$out"
  t_all=$SECONDS
  status=0
  for entry in $SD_SCRIPTS_MATRIX; do
    co=${entry%%=*}; py=${entry#*=}; name=$(basename "$co")
    mkdir -p "$out/$name"
    log "=== $name: $co with $py"
    t0=$SECONDS
    if _IMMISCIBLE_E2E_ONE=1 SD_SCRIPTS_DIR=$co IMMISCIBLE_VENV=$py IMMISCIBLE_E2E_RUNS=$out/$name \
         bash "${BASH_SOURCE[0]}" --skip-multi > "$out/$name/stdout.json" 2> "$out/$name/stderr.log"; then
      log "=== $name: passed in $((SECONDS - t0)) s"
    else
      status=1; log "=== $name: FAILED in $((SECONDS - t0)) s (see $out/$name/stderr.log)"; tail -30 "$out/$name/stderr.log" >&2
    fi
    echo $((SECONDS - t0)) > "$out/$name/matrix_wall_s"
  done
  python3 - "$out" "$SECONDS" "$t_all" $SD_SCRIPTS_MATRIX <<'PYEOF'
import json, os, sys
out, now, t0, entries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rows = {}
for entry in entries:
    co = entry.split("=", 1)[0]
    name = os.path.basename(co)
    d = os.path.join(out, name)
    try:
        summary = json.load(open(os.path.join(d, "summary.json")))
    except (OSError, ValueError):
        summary = {"failures": ["no summary (see stderr.log)"]}
    rows[name] = {"checkout": co, "wall_s": int(open(os.path.join(d, "matrix_wall_s")).read()),
                  "passed": summary.get("failures") == [], "failures": summary.get("failures"),
                  "version": summary.get("version"), "k8_metadata": summary.get("k8", {}).get("metadata"),
                  "off_lora_bit_identical_to_stock": summary.get("stock", {}).get("off_lora_bit_identical")}
res = {"total_wall_s": now - t0, "checkouts": rows}
json.dump(res, open(os.path.join(out, "matrix.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
PYEOF
  exit $status
fi

# ---- fixtures (idempotent) and the pack ------------------------------------------------------
if [ -x "${IMMISCIBLE_VENV:-}" ] && [ -f "${SD_SCRIPTS_DIR:-}/train_network.py" ] \
   && [ -s "${IMMISCIBLE_CACHE:-}/sd15_random.safetensors" ] && [ -d "$IMMISCIBLE_CACHE/train_images" ]; then
  log "using SD_SCRIPTS_DIR=$SD_SCRIPTS_DIR IMMISCIBLE_VENV=$IMMISCIBLE_VENV IMMISCIBLE_CACHE=$IMMISCIBLE_CACHE"
else
  eval "$("$repo/scripts/setup_integration.sh" "$EXT_DIR")"
fi
PY=$IMMISCIBLE_VENV
VENV_BIN=$(dirname "$PY")
"$PY" "$repo/install.py" --sd-scripts "$SD_SCRIPTS_DIR" --python "$PY" >&2

RUNS=${IMMISCIBLE_E2E_RUNS:-$IMMISCIBLE_CACHE/e2e-runs}
mkdir -p "$RUNS"
ln -sfn "$IMMISCIBLE_CACHE/train_images" "$RUNS/train_images"
cd "$RUNS"   # configs/dataset_smoke_64px.toml has image_dir = "train_images", relative to here

common=(
  --pretrained_model_name_or_path "$IMMISCIBLE_CACHE/sd15_random.safetensors"
  --tokenizer_cache_dir "$IMMISCIBLE_CACHE/tokenizer"
  --dataset_config "$repo/configs/dataset_smoke_64px.toml"
  --network_module networks.lora --network_dim 4 --learning_rate 1e-4
  --max_train_steps 2 --mixed_precision no --sdpa --seed 42
  --save_model_as safetensors --output_name lora --log_with tensorboard
)

train() {  # NAME LAUNCHER... -- EXTRA_ARGS...
  local name=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done; shift
  rm -rf "$RUNS/$name"; mkdir -p "$RUNS/$name"
  log "run $name: ${launcher[*]} train_network.py $*"
  local t0=$SECONDS
  # PYTHONPATH=<checkout>, as the kohya_ss GUI sets it: a venv shared by checkouts imports this one's library
  ( IMMISCIBLE_KOHYA_DUMP="$RUNS/$name/dump" PYTHONUNBUFFERED=1 PYTHONPATH="$SD_SCRIPTS_DIR${PYTHONPATH:+:$PYTHONPATH}" \
      flock "$LOCK" "${launcher[@]}" "$SD_SCRIPTS_DIR/train_network.py" "${common[@]}" \
      --output_dir "$RUNS/$name/out" --logging_dir "$RUNS/$name/logs" "$@" ) > "$RUNS/$name/train.log" 2>&1 \
    || { tail -40 "$RUNS/$name/train.log" >&2; log "run $name FAILED"; exit 1; }
  echo $((SECONDS - t0)) > "$RUNS/$name/wall_s"
  log "run $name: done in $((SECONDS - t0)) s"
}

if [ "$SINGLE" = 1 ]; then
  train k8  "$PY" -- --immiscible_k 8
  train off "$PY" --
  # stock sd-scripts: the start-up hook switched off, so nothing of the pack is imported
  IMMISCIBLE_KOHYA_DISABLE=1 train stock "$PY" --
fi
if [ "$REPRO" = 1 ]; then train k8_again "$PY" -- --immiscible_k 8; fi
# Two CPU ranks: `accelerate launch --multi_gpu` with no visible GPU (gloo), plus the test-only
# DDP shim scripts/fixtures/ddp_cpu_shim (why: its docstring), on PYTHONPATH for this run only.
if [ "$MULTI" = 1 ]; then PYTHONPATH="$repo/scripts/fixtures/ddp_cpu_shim${PYTHONPATH:+:$PYTHONPATH}" CUDA_VISIBLE_DEVICES="" train k8_2proc "$VENV_BIN/accelerate" launch --multi_gpu \
    --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process 1 -- --immiscible_k 8; fi

# ---- checks --------------------------------------------------------------------------------
"$PY" - "$RUNS" "$REPRO" "$MULTI" "$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from kohya_patch.host import HOST; print(HOST.describe(sys.argv[2]))' "$repo" "$SD_SCRIPTS_DIR")" <<'PYEOF'
import glob, json, os, sys
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

runs, repro, multi = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
summary, failures = {"version": sys.argv[4]}, []

def check(cond, msg):
    if not cond:
        failures.append(msg)

def run_info(name):
    d = os.path.join(runs, name)
    with safe_open(os.path.join(d, "out", "lora.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    dumps = {os.path.basename(p): [json.loads(l) for l in open(p)] for p in sorted(glob.glob(f"{d}/dump/*.jsonl"))}
    red, loss, stock = [], [], []
    for ev in glob.glob(f"{d}/logs/**/events.out.tfevents*", recursive=True):
        ea = EventAccumulator(ev); ea.Reload()
        if "immiscible/reduction" in ea.Tags()["scalars"]:
            red += [(e.step, round(e.value, 5)) for e in ea.Scalars("immiscible/reduction")]
        if "immiscible/stock_batches" in ea.Tags()["scalars"]:
            stock += [(e.step, e.value) for e in ea.Scalars("immiscible/stock_batches")]
        if "loss/current" in ea.Tags()["scalars"]:
            loss += [(e.step, e.value) for e in ea.Scalars("loss/current")]
    log = open(os.path.join(d, "train.log"), encoding="utf-8", errors="replace").read()
    return {"wall_s": int(open(os.path.join(d, "wall_s")).read()), "steps": meta.get("ss_steps"),
            "metadata": {k: v for k, v in meta.items() if k.startswith("ss_immiscible")},
            "n_metadata": len(meta), "tb_reduction": red, "tb_stock": stock, "tb_loss": sorted(loss), "dumps": dumps, "weights": weights,
            "summary_line": "immiscible: k=" in log}

k8, off = run_info("k8"), run_info("off")
check(k8["metadata"].get("ss_immiscible_k") == "8" and k8["metadata"].get("ss_immiscible_mode") == "knn"
      and k8["metadata"].get("ss_immiscible_stock_batches") == "0", f"k8 metadata: {k8['metadata']}")
check(off["metadata"] == {}, f"off run has immiscible metadata: {off['metadata']}")
check(k8["steps"] == "2" and off["steps"] == "2", "not 2 steps")
check(k8["summary_line"] and not off["summary_line"], "start-up summary line")
check(len(k8["tb_reduction"]) == 2 and all(v > 0 for _, v in k8["tb_reduction"]),
      f"tensorboard reduction {k8['tb_reduction']}")
check(len(k8["tb_stock"]) == 2 and all(v == 0 for _, v in k8["tb_stock"]), f"tensorboard stock {k8['tb_stock']}")
check(not off["tb_reduction"] and not off["tb_stock"] and not off["dumps"], "the off run selected noise")
rows = k8["dumps"].get("rank0.jsonl", [])
check(len(rows) == 2 and all(r["k"] == 8 for r in rows), f"k8 dump {rows}")
summary["k8"] = {"wall_s": k8["wall_s"], "metadata": k8["metadata"], "tensorboard_reduction": k8["tb_reduction"],
                 "selections": [{"seed": r["seed"], "index": r["index"], "reduction": round(r["reduction"], 5)}
                                for r in rows]}
summary["off"] = {"wall_s": off["wall_s"], "metadata": off["metadata"], "n_metadata": off["n_metadata"]}
if os.path.isdir(os.path.join(runs, "stock")):
    # Option absent with the pack installed must be bit-identical to stock sd-scripts.
    stock = run_info("stock")
    same_weights = stock["weights"].keys() == off["weights"].keys() and all(
        torch.equal(stock["weights"][k], v) for k, v in off["weights"].items())
    check(same_weights, "the off run's LoRA weights differ from stock sd-scripts'")
    check(len(off["tb_loss"]) == 2 and off["tb_loss"] == stock["tb_loss"],
          f"losses differ from stock: {off['tb_loss']} vs {stock['tb_loss']}")
    check(not stock["summary_line"], "the stock run loaded the pack")
    summary["stock"] = {"wall_s": stock["wall_s"], "losses": stock["tb_loss"], "off_losses": off["tb_loss"],
                        "off_lora_bit_identical": same_weights}
if repro:
    again = run_info("k8_again")
    same = all((again["weights"][k] == v).all().item() for k, v in k8["weights"].items())
    same_sel = [(r["seed"], r["index"]) for r in again["dumps"]["rank0.jsonl"]] == [(r["seed"], r["index"]) for r in rows]
    check(same and same_sel, "k=8 is not reproducible under --seed")
    summary["k8_again"] = {"wall_s": again["wall_s"], "same_selection": same_sel, "same_lora_weights": same}
if multi:
    m = run_info("k8_2proc")
    r0, r1 = m["dumps"].get("rank0.jsonl", []), m["dumps"].get("rank1.jsonl", [])
    check(len(r0) == 2 and len(r1) == 2, f"2-process dumps: {len(r0)} and {len(r1)} rows")
    check(all(a["world_size"] == 2 and b["world_size"] == 2 and a["rank"] == 0 and b["rank"] == 1
              for a, b in zip(r0, r1)), "ranks / world size")
    check(all(a["seed"] != b["seed"] for a, b in zip(r0, r1)), "the two ranks used the same candidate pool")
    check(m["metadata"].get("ss_immiscible_k") == "8", f"2-process metadata {m['metadata']}")
    summary["k8_2proc"] = {"wall_s": m["wall_s"], "metadata": m["metadata"], "tensorboard_reduction": m["tb_reduction"],
                           "per_step": [{"drawn_seed_rank0": a["drawn_seed"], "drawn_seed_rank1": b["drawn_seed"],
                                         "pool_seed_rank0": a["seed"], "pool_seed_rank1": b["seed"],
                                         "index_rank0": a["index"], "index_rank1": b["index"],
                                         "reduction_rank0": round(a["reduction"], 5),
                                         "reduction_rank1": round(b["reduction"], 5)} for a, b in zip(r0, r1)]}
summary["failures"] = failures
json.dump(summary, open(os.path.join(runs, "summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(1 if failures else 0)
PYEOF
log "all checks passed; summary: $RUNS/summary.json"

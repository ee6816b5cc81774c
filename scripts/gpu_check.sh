#!/usr/bin/env bash
# GPU check, for a lent CUDA machine (about 3-5 minutes):
#   1. the test suite with the Triton kernels compiled (TRITON_INTERPRET unset), CUDA-only tests included;
#   2. python -m immiscible_lab.bench --quick on CUDA, JSON included;
#   3. python -m immiscible_lab.kernel_report.aot --time --bench: the kernels compiled for every architecture, then
#      timed on this GPU and the bench rows, each beside the PREDICTED time (checks the model).
# Logs and JSON go to $OUT (or ./gpu-check-out); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/device.txt"

timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_select.py tests/test_triton_kernel.py \
    tests/test_statistics.py 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}

timeout 240 $PY -m immiscible_lab.bench --quick --device cuda --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

timeout 180 $PY -m immiscible_lab.kernel_report.aot --time --bench "$OUT/bench_cuda.json" --json "$OUT/aot.json" 2>&1 \
    | tee "$OUT/aot.log"
aot_rc=${PIPESTATUS[0]}

echo
echo "== gpu_check summary =="
head -n 2 "$OUT/device.txt"
tail -n 1 "$OUT/pytest.log"
sed -n '/^  B /,$p' "$OUT/bench.log" | grep -E '^ +16 +256 +65536|^  B |fp16' || tail -n 20 "$OUT/bench.log"
sed -n '/^kernels timed on/,/^$/p;/^measured vs PREDICTED/,/^$/p' "$OUT/aot.log"
grep '^PROBLEM' "$OUT/aot.log"
echo "tests rc=$test_rc bench rc=$bench_rc aot rc=$aot_rc; files in $OUT"
exit $(( test_rc || bench_rc || aot_rc ))

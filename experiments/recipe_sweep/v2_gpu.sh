#!/usr/bin/env bash
# Round 5 of the recipe sweep on a lent GPU, in one go (experiments/recipe_sweep/README.md):
# the package's CUDA path (bonefrac train --device cuda, torchrun --nproc-per-node 1), then the
# v2 sweep, each run scored on VALIDATION (the pack holds train + val only). Results in $OUT.
#   bash experiments/recipe_sweep/v2_gpu.sh            # on the device machine (python3 has torch)
#   SMOKE=1 bash experiments/recipe_sweep/v2_gpu.sh    # here: tiny runs on the CPU, a few minutes
# Knobs: BUDGET (seconds for everything, default 500), WORKERS (runs at once, default 4),
# PACK (default .gpu/v2, or .gpu/v2smoke with SMOKE=1), WORK (run folders and caches),
# SKIP_CHECK=1 (sweep only, e.g. for a shorter second try).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/v2gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  export OMP_NUM_THREADS=1
  # CPU: gloo DDP with 2 processes for the torchrun check (one GPU allows only 1 under NCCL)
  ARGS=(--device cpu --smoke --pack "${PACK:-.gpu/v2smoke}" --workers "${WORKERS:-2}"
        --nproc 2 --budget "${BUDGET:-600}" --work "${WORK:-/tmp/v2gpu_smoke_work}")
  NICE=(nice -n 10)
else
  PY=${PY:-python3}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 3
  ARGS=(--device cuda --pack "${PACK:-.gpu/v2}" --workers "${WORKERS:-4}" --nproc 1
        --budget "${BUDGET:-500}" --work "${WORK:-auto}")
  NICE=()
fi
[ "${SKIP_CHECK:-0}" = 1 ] && ARGS+=(--skip-check)
"${NICE[@]}" "$PY" experiments/recipe_sweep/v2_gpu.py --out "$OUT" "${ARGS[@]}" 2>&1 \
  | tee "$OUT/console.txt"

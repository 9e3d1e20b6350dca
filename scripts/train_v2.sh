#!/usr/bin/env bash
# The v2 CPU recipe: each v1 member warm-started at 320 px and fine-tuned with box supervision
# (the data set's boxes.csv), then fused and fitted on validation. Usage:
#   bash scripts/train_v2.sh DATA RUNS_DIR ENSEMBLE_OUT
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}; OUT=${3:-$RUNS/ensemble_v2}
V1=src/bonefrac/pretrained/ensemble_bone-fracture_v1
BF=${BONEFRAC:-bonefrac}
COMMON=(--data "$DATA" --init-from "$V1" --size 320 --epochs-frozen 0 --epochs-finetune 6
        --views 6 --lr-finetune 2e-4 --loc-weight 1.0)
for arch in mobilenetv2 efficientnet_lite0; do
  time $BF train --arch "$arch" --out "$RUNS/${arch}_v2_320" "${COMMON[@]}" ${RESUME:+--resume}
done
$BF ensemble fit --members "$RUNS/mobilenetv2_v2_320" "$RUNS/efficientnet_lite0_v2_320" \
    --data "$DATA" --out "$OUT" --fit-weights --model-id bonefrac-mnv2-lite0-bone-fracture-v2

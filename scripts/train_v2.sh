#!/usr/bin/env bash
# The v2 CPU recipe: each v1 member warm-started at 320 px and fine-tuned with box supervision
# (the data set's boxes.csv), then fused and fitted on validation. Usage:
#   bash scripts/train_v2.sh DATA RUNS_DIR ENSEMBLE_OUT
# RESIZE=letterbox trains both members with aspect-preserving letterbox inputs instead of the
# shipped v2's stretch (better validation AUC for MobileNetV2 in round 4; see
# benchmarks/recipe_sweep/README.md).
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}; OUT=${3:-$RUNS/ensemble_v2}
V1=src/bonefrac/pretrained/ensemble_bone-fracture_v1
BF=${BONEFRAC:-bonefrac}
COMMON=(--data "$DATA" --init-from "$V1" --size 320 --epochs-frozen 0 --epochs-finetune 6
        --views 6 --lr-finetune 2e-4 --loc-weight 1.0 --resize "${RESIZE:-stretch}")
for arch in mobilenetv2 efficientnet_lite0; do
  time $BF train --arch "$arch" --out "$RUNS/${arch}_v2_320${RESIZE:+_$RESIZE}" "${COMMON[@]}" ${RESUME:+--resume}
done
$BF ensemble fit --members "$RUNS/mobilenetv2_v2_320${RESIZE:+_$RESIZE}" \
    "$RUNS/efficientnet_lite0_v2_320${RESIZE:+_$RESIZE}" \
    --data "$DATA" --out "$OUT" --fit-weights --model-id bonefrac-mnv2-lite0-bone-fracture-v2

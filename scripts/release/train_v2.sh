#!/usr/bin/env bash
# The v2 CPU recipe, step 1: each v1 member warm-started at 320 px and fine-tuned with box
# supervision (the data set's boxes.csv). Step 2, fitting and shipping: scripts/release/ship_v2.sh.
# Usage:
#   bash scripts/release/train_v2.sh DATA RUNS_DIR
# RESIZE=letterbox trains with aspect-preserving letterbox inputs instead of stretch, and
# LOC_WEIGHT=3 weights the fracture-map loss 3 instead of 1; the run folders are named after
# both (runs/mobilenetv2_v2_320_letterbox_loc3); give ship_v2.sh the same. Which won on
# validation: experiments/recipe_sweep/README.md, round 4.
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}
SUFFIX=${RESIZE:+_$RESIZE}${LOC_WEIGHT:+_loc$LOC_WEIGHT}
V1=src/bonefrac/pretrained/ensemble_bone-fracture_v1
BF=${BONEFRAC:-bonefrac}
COMMON=(--data "$DATA" --init-from "$V1" --size 320 --epochs-frozen 0 --epochs-finetune 6
        --views 6 --lr-finetune 2e-4 --loc-weight "${LOC_WEIGHT:-1.0}"
        --resize "${RESIZE:-stretch}")
for arch in mobilenetv2 efficientnet_lite0; do
  time $BF train --arch "$arch" --out "$RUNS/${arch}_v2_320$SUFFIX" "${COMMON[@]}" ${RESUME:+--resume}
done

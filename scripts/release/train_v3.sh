#!/usr/bin/env bash
# The v3 CPU recipe, step 1: v2's MobileNetV2 member warm-started at 384 px (letterbox) with an
# FCOS-style detection head on its stride 8/16/32 feature maps, trained jointly with the
# classifier and the fracture map against the data set's boxes.csv; the epoch kept is the best
# validation AP@0.5. Step 2, fitting and shipping: scripts/release/ship_v3.sh. Usage:
#   bash scripts/release/train_v3.sh DATA RUNS_DIR        (RESUME=1 continues an interrupted run)
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}
BF=${BONEFRAC:-bonefrac}
V2=src/bonefrac/pretrained/ensemble_bone-fracture_v2
time $BF train --data "$DATA" --arch mobilenetv2 --init-from "$V2" --size 384 \
    --resize letterbox --epochs-frozen 0 --epochs-finetune 7 --views 7 --loc-weight 3 \
    --det-weight 1 --stop-on val_ap50 --batch-size 16 --lr-finetune 3e-4 \
    --out "$RUNS/mobilenetv2_v3_384_det" ${RESUME:+--resume}

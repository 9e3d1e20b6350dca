#!/usr/bin/env bash
# Fit, export, evaluate and ship the v2 ensemble from the two runs scripts/release/train_v2.sh made.
# Everything fitted (temperatures, fusion weights, threshold, operating points) comes from the
# VALIDATION split; the test split is only reported. Usage:
#   bash scripts/release/ship_v2.sh DATA RUNS_DIR
# RESIZE and LOC_WEIGHT pick the runs, as for train_v2.sh.
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}; SUFFIX=${RESIZE:+_$RESIZE}${LOC_WEIGHT:+_loc$LOC_WEIGHT}
BF=${BONEFRAC:-bonefrac}
V2=src/bonefrac/pretrained/ensemble_bone-fracture_v2
V1=src/bonefrac/pretrained/ensemble_bone-fracture_v1
rm -rf "$RUNS/ensemble_v2$SUFFIX"
$BF ensemble fit --members "$RUNS/mobilenetv2_v2_320$SUFFIX" "$RUNS/efficientnet_lite0_v2_320$SUFFIX" \
    --data "$DATA" --out "$RUNS/ensemble_v2$SUFFIX" --fit-weights logloss \
    --model-id "bonefrac-mnv2-lite0-bone-fracture-v2${SUFFIX//_/-}"
rm -rf "$V2"; mkdir -p "$V2"
cp "$RUNS"/ensemble_v2$SUFFIX/{ensemble_meta.json,domain_gate.npz,*.onnx,*.safetensors,*_history.json} "$V2/"
# the package is written only where named: --out for the results, --card for the shipped card
$BF evaluate --model "$V2" --data "$DATA" --split test --subgroup yolo_classes \
    --compare-with "$V1" --out "$V2/Results" --no-report
$BF predict examples/test_images --model "$V2" --explain --out "$V2/Results/example_predictions"
$BF report "$V2" --results "$V2/Results" --out "$V2/Results" --card "$V2/MODEL_CARD.md" --data "$DATA"

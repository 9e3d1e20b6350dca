#!/usr/bin/env bash
# Fit, export, evaluate and ship the v3 ensemble: the detector member scripts/release/train_v3.sh made
# and v2's EfficientNet-Lite0 member, unchanged (its files are referenced from the v2 folder,
# not copied: weights are stored once). Everything fitted (temperatures, fusion weights,
# thresholds, operating points, the box threshold, the domain gate) comes from the VALIDATION
# split; the test split is only reported. Usage:
#   bash scripts/release/ship_v3.sh DATA RUNS_DIR
set -euo pipefail
DATA=${1:?data folder}; RUNS=${2:-runs}
BF=${BONEFRAC:-bonefrac}; PY=${PYTHON:-python}
V1=src/bonefrac/pretrained/ensemble_bone-fracture_v1
V2=src/bonefrac/pretrained/ensemble_bone-fracture_v2
V3=${V3:-src/bonefrac/pretrained/ensemble_bone-fracture_v3}
$PY -c "from bonefrac.training.fit import member_as_run as m; m('$V2', 'efficientnet_lite0', '$RUNS/efficientnet_lite0_v2_member')"
rm -rf "$RUNS/ensemble_v3"
$BF ensemble fit --members "$RUNS/mobilenetv2_v3_384_det" "$RUNS/efficientnet_lite0_v2_member" \
    --data "$DATA" --out "$RUNS/ensemble_v3" --fit-weights logloss \
    --model-id bonefrac-mnv2det-lite0-bone-fracture-v3
rm -rf "$V3"; mkdir -p "$V3"
cp "$RUNS"/ensemble_v3/{ensemble_meta.json,mobilenetv2.onnx,mobilenetv2.safetensors,mobilenetv2_history.json} "$V3/"
cp "$RUNS"/ensemble_v3/domain_gate.npz "$V3/"  # ensemble fit says so when it fits none
# the Lite0 member's files are v2's: point at them instead of shipping a second copy
$PY -c "from bonefrac.training.fit import share_member_files as s; s('$V3', 'efficientnet_lite0', '$V2')"
$BF evaluate --model "$V3" --data "$DATA" --split test --subgroup yolo_classes \
    --compare-with "$V2" --out "$V3/Results" --no-report
$BF predict examples/test_images --model "$V3" --explain --out "$V3/Results/example_predictions"
$BF report "$V3" --results "$V3/Results" --out "$V3/Results" --card "$V3/MODEL_CARD.md" --data "$DATA"

"""Validation-only comparison of models for the v2 recipe: ROC-AUC, horizontal-flip TTA, and the
pointing game of each heat map a member can emit (its fracture map and Grad-CAM).

    python experiments/recipe_sweep/v2_val.py --data ../shared/data/bone-fracture \
        MODEL_DIR [MODEL_DIR ...] > val.json

Reads the VALIDATION split only (never test). Prints one JSON object per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bonefrac import FRACTURE_MAP, GRADCAM
from bonefrac.data.boxes import dataset_boxes
from bonefrac.data.dataset import load_index
from bonefrac.evaluation.evaluate import decode_inputs, scored_samples
from bonefrac.evaluation.localisation import localisation_metrics
from bonefrac.evaluation.metrics import bootstrap_auc_ci, roc_auc
from bonefrac.inference import Ensemble


def _probs(ens: Ensemble, gray: dict[int, np.ndarray], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(next(iter(gray.values()))), batch):
        out.append(ens.predict_gray({s: g[i:i + batch] for s, g in gray.items()}).prob)
    return np.concatenate(out)


def _set_heatmap(ens: Ensemble, kind: str) -> bool:
    """Switch every member that can to ``kind``; False when a member cannot emit it."""
    for m in ens.members:
        model = getattr(m.runner, "model", None)
        if kind == FRACTURE_MAP and (model is None or model.loc is None):
            return False
        if model is not None:
            model.config["heatmap"] = kind
        m.spec["heatmap"] = kind
    return True


def _pointing(ens: Ensemble, gray: dict[int, np.ndarray], gt: list[np.ndarray],
              aspects: np.ndarray) -> dict:
    peaks, boxes, maps = [], [], []
    for i in range(0, len(gt), 32):
        p = ens.predict_gray({s: g[i:i + 32] for s, g in gray.items()}, explain=True,
                             aspect=aspects[i:i + 32])
        peaks.append(p.loc.peak)
        boxes.append(p.loc.box)
        maps.append(p.cam)
    m = localisation_metrics(np.concatenate(peaks), np.concatenate(boxes),
                             np.concatenate(maps), gt, n_worst=0)
    return {k: {"value": m[k]["value"], "ci95": m[k]["ci95"]}
            for k in ("pointing_game", "box_hit_rate", "mass_inside")}


def evaluate(model_dir: str, index, boxes) -> dict:
    t0 = time.time()
    ens = Ensemble.load(model_dir, backend="torch")
    val = index.split("val")
    gray, kept, _, _ = decode_inputs(ens, val, "decoding")
    y = np.array([k.label for k in kept])
    p = _probs(ens, gray)
    p_flip = _probs(ens, {s: g[:, :, ::-1].copy() for s, g in gray.items()})
    lo, hi = bootstrap_auc_ci(y, p)
    out = {"model": model_dir, "sizes": sorted(ens.sizes), "resize": ens.resize, "n_val": len(y),
           "val_auc": roc_auc(y, p), "val_auc_ci95": [lo, hi],
           "val_auc_hflip_tta": roc_auc(y, (p + p_flip) / 2)}
    scored = scored_samples(val, boxes)
    sgray, skept, _, aspects = decode_inputs(ens, scored, "decoding")
    gt = [boxes[k.rel] for k in skept]
    for kind in (FRACTURE_MAP, GRADCAM):
        if _set_heatmap(ens, kind):
            out[f"localisation_{kind}"] = _pointing(ens, sgray, gt, aspects)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    index = load_index(a.data)
    boxes = dataset_boxes(a.data)
    if boxes is None:
        print(f"{a.data}: no boxes.csv", file=sys.stderr)
        return 2
    for m in a.models:
        print(json.dumps(evaluate(m, index, boxes)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

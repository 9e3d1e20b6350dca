"""Detection metrics from a ``bonefrac predict`` output's ``detections.csv`` against the data
set's ``boxes.csv`` (the acceptance measure of model v3). Prints JSON.

    bonefrac predict $(python evaluations/pointing_game.py --data D --list test) --out /tmp/p
    python evaluations/detection_ap.py --data D --predictions /tmp/p

Every predicted image counts (a detection on a non-fractured image is a false positive).
AP@0.5: IoU >= 0.5, PASCAL VOC all-point rule, with a bootstrap CI over images; AP@[.5:.95]
and AP@0.75: pycocotools; FROC: box sensitivity at 0.25-4 false positives per image; per body
region (the box class): AP@0.5 on that region's fractured images plus every non-fractured one.
``--min-score S`` keeps only detections scoring >= S (e.g. the model's box threshold).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from bonefrac.data.boxes import box_classes, dataset_boxes
from bonefrac.evaluation.detection import detection_report


def read_detections(out: Path, root: Path, min_score: float = 0.0
                    ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(the predicted files relative to ``root``, {file: (boxes (K, 4), scores (K,))})."""
    with open(out / "predictions.csv", newline="") as f:
        files = [Path(r["file"]).resolve().relative_to(root).as_posix()
                 for r in csv.DictReader(f)]
    per: dict[str, list[list[float]]] = defaultdict(list)
    with open(out / "detections.csv", newline="") as f:
        for r in csv.DictReader(f):
            if float(r["score"]) >= min_score:
                rel = Path(r["file"]).resolve().relative_to(root).as_posix()
                per[rel].append([float(r[k]) for k in ("x0", "y0", "x1", "y1", "score")])
    dets = {k: (np.asarray(v)[:, :4], np.asarray(v)[:, 4]) for k, v in per.items()}
    return files, dets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data folder with boxes.csv")
    ap.add_argument("--predictions", required=True, help="a `bonefrac predict --out` folder")
    ap.add_argument("--min-score", type=float, default=0.0,
                    help="keep detections scoring at least this (default: all)")
    a = ap.parse_args()
    root = Path(a.data).resolve()
    boxes = dataset_boxes(root)
    files, dets = read_detections(Path(a.predictions), root, a.min_score)
    regions = box_classes(root)
    empty = (np.zeros((0, 4)), np.zeros(0))
    report = detection_report([dets.get(f, empty) for f in files],
                              [boxes.get(f, np.zeros((0, 4))) for f in files],
                              [regions.get(f, "") for f in files])
    print(json.dumps({"predictions": a.predictions, "min_score": a.min_score, **report},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

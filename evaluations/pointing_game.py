"""Pointing game from a ``bonefrac predict`` output: its ``peak_x``/``peak_y`` columns against
the data set's ``boxes.csv`` (the acceptance measure of the v2 model). Prints JSON.

    bonefrac predict $(python evaluations/pointing_game.py --data D --list test) --out /tmp/p
    python evaluations/pointing_game.py --data D --predictions /tmp/p

``--list SPLIT`` prints the split's files (one per line) instead. A hit: the peak inside a
fracture box grown by 15/224 of the image on every side (bonefrac.evaluation.localisation).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from bonefrac.data.boxes import dataset_boxes
from bonefrac.data.dataset import load_index
from bonefrac.evaluation.localisation import bootstrap_mean_ci, pointing_hits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data folder with boxes.csv")
    ap.add_argument("--predictions", help="a `bonefrac predict --out` folder")
    ap.add_argument("--list", metavar="SPLIT", help="print this split's files and stop")
    a = ap.parse_args()
    root = Path(a.data).resolve()
    if a.list:
        print("\n".join(str(s.path) for s in load_index(root).split(a.list)))
        return 0
    boxes = dataset_boxes(root)
    with open(Path(a.predictions) / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    peaks, gt, files = [], [], []
    for r in rows:
        rel = Path(r["file"]).resolve().relative_to(root).as_posix()
        if rel in boxes:
            peaks.append((float(r["peak_x"]), float(r["peak_y"])))
            gt.append(boxes[rel])
            files.append(rel)
    hits = pointing_hits(np.array(peaks), gt)
    lo, hi = bootstrap_mean_ci(hits.astype(float))
    print(json.dumps({"predictions": a.predictions, "n_images_with_boxes": len(files),
                      "hits": int(hits.sum()), "pointing_game": float(hits.mean()),
                      "ci95": [float(lo), float(hi)], "model_id": rows[0]["model_id"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

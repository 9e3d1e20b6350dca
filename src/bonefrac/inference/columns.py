"""The column guide of ``predictions.csv``: ``predictions.schema.json``, written beside it.

One description per column (:data:`COLUMNS`; the per-member and per-operating-point columns by
pattern, :data:`PATTERNS`), as a JSON Schema (draft 2020-12) of one row of the CSV, with the
columns in their CSV order under ``x-columns`` and the research-use disclaimer.
``tests/test_new_user.py`` checks that every column of a real run's CSV is described here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bonefrac import CLASSES, DISCLAIMER
from bonefrac.inference.domain import UNCERTAIN
from bonefrac.utils import write_json

SCHEMA_NAME = "predictions.schema.json"
_NUM, _STR = {"type": "number"}, {"type": "string"}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_BOX = "fraction (0..1) of the image's width or height from its top-left corner: "
_BOX_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
# every box of an image, with rank and score, is a row of detections.csv beside this file
_BEST = (" (rank 1 of detections.csv: a model with a detection head, empty when it found "
         "none; else the region around the heat map's peak)")

# column -> (JSON Schema type, description)
COLUMNS: dict[str, tuple[dict, str]] = {
    "file": (_STR, "the input file, as given on the command line or found in a folder"),
    "prob_fractured": (_FRACTION, "the fused, calibrated probability that the image shows a "
                                  "fracture (a probability, not a yes/no)"),
    "decision": ({"enum": [CLASSES[1], CLASSES[0], UNCERTAIN]},
                 "fractured when prob_fractured >= threshold, else non_fractured; uncertain "
                 "when the input-domain gate flagged the image (warning says why; "
                 "--no-gate keeps the model's answer)"),
    "confidence": ({"type": ["number", "null"], "minimum": 0, "maximum": 1},
                   "the calibrated probability that decision is right: prob_fractured for "
                   "fractured, 1 - prob_fractured for non_fractured, empty (null) for "
                   "uncertain; at a low (triage) threshold a fractured call can read 0.22"),
    "threshold": (_FRACTION, "the threshold on prob_fractured that drove decision: the "
                             "model's default, or that of --operating-point"),
    "peak_x": (_FRACTION, _BOX + "x of the heat map's maximum"),
    "peak_y": (_FRACTION, _BOX + "y of the heat map's maximum"),
    "box_x0": (_BOX_OR_NULL, _BOX + "left edge of the best box" + _BEST),
    "box_y0": (_BOX_OR_NULL, _BOX + "top edge of the best box" + _BEST),
    "box_x1": (_BOX_OR_NULL, _BOX + "right edge of the best box" + _BEST),
    "box_y1": (_BOX_OR_NULL, _BOX + "bottom edge of the best box" + _BEST),
    "box_score": ({"type": ["number", "null"]},
                  "the best box's score: its detection score (a model with a detection head), "
                  "else the fused fracture map's peak (a per-cell P(fracture)) for a model "
                  "with a trained fracture map, else P(fractured)"),
    "domain_score": ({"type": ["number", "null"]},
                     "the input-domain gate's learned check: how far the image's features lie "
                     "from the training images', in units of a limit met by 0.5% of "
                     "validation images; > 1 is outside the training distribution; empty "
                     "where the model has no gate"),
    "model_id": (_STR, "which model made the prediction"),
    "version": (_STR, "which bonefrac version made the prediction"),
    "warning": (_STR, "why the input-domain gate flagged the image (colour, too small, blank, "
                      "aspect ratio, DICOM modality or body part, outside the training "
                      "distribution), '; '-joined; empty when none"),
    "heatmap": (_STR, "with --explain: the overlay PNG's path (empty if it could not be "
                      "written; warning says why)"),
}
# column pattern -> (type, description), for the columns whose names depend on the model
PATTERNS: dict[str, tuple[dict, str]] = {
    r"^prob_(?!fractured$).+$": (_FRACTION, "one ensemble member's calibrated "
                                            "P(fractured), before fusion"),
    r"^decision_.+$": ({"enum": [CLASSES[1], CLASSES[0]]},
                       "the model's decision at that named operating point (triage: "
                       "sensitivity >= 0.95 on validation; confirmation: specificity >= "
                       "0.90), whatever the gate says"),
}


def describe(column: str) -> tuple[dict, str] | None:
    """(type, description) of ``column``, or None when the guide does not know it."""
    if column in COLUMNS:
        return COLUMNS[column]
    return next((v for pat, v in PATTERNS.items() if re.match(pat, column)), None)


def predictions_schema(fields: Sequence[str]) -> dict:
    """The JSON Schema of one row with columns ``fields`` (in CSV order)."""
    props = {}
    for f in fields:
        kind, text = describe(f) or ({}, "not described in this version's guide")
        props[f] = {**kind, "description": text}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "bonefrac predictions.csv row", "disclaimer": DISCLAIMER,
            "description": "One row of predictions.csv: one image (predictions.json's "
                           "'predictions' hold the same keys, and may hold more, such as the "
                           "box list 'detections'). Failed files are in errors.csv (file, "
                           "reason), not here. " + DISCLAIMER,
            "type": "object", "x-columns": list(fields), "properties": props,
            "patternProperties": {p: {**k, "description": d} for p, (k, d) in PATTERNS.items()},
            "required": [f for f in ("file", "prob_fractured", "decision") if f in fields]}


def write_schema(out: str | Path, fields: Sequence[str]) -> Path:
    """Write ``out/predictions.schema.json`` for the columns ``fields`` atomically."""
    path = Path(out) / SCHEMA_NAME
    write_json(path, predictions_schema(fields))
    return path

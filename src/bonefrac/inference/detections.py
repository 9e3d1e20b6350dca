"""Scored fracture boxes per image: the rows of ``detections.csv`` and the boxes a reader sees.

A prediction row carries ``detections``: a list, best first, of
``{"rank", "score", "x0", "y0", "x1", "y1"}`` with coordinates as fractions of the original
image's width and height (top-left origin) and ``rank`` 1 = best. A model with a detection head
lists every box its decoder kept (down to a low score, so that AP and FROC can be measured); a
model without one (v1, v2) lists its heat-map box (``box_*`` columns) as its only detection.

What is *shown* (overlays, DICOM SR / GSPS, the web page) is :func:`shown_detections`: the boxes
at or above the model's box threshold, and none on an image that is not decided fractured, so a
picture never shows a box on an image the model calls non-fractured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DETECTION_COLUMNS = ("file", "rank", "score", "x0", "y0", "x1", "y1")
COORDS = ("x0", "y0", "x1", "y1")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1", "box_score")
FRACTURED = "fractured"


def detection_dicts(boxes: np.ndarray, scores: np.ndarray) -> list[dict]:
    """``(K, 4)`` fraction boxes and ``(K,)`` scores -> the ``detections`` list, best first."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return [{"rank": r + 1, "score": round(float(scores[i]), 4),
             **{k: round(float(v), 4) for k, v in zip(COORDS, boxes[i], strict=True)}}
            for r, i in enumerate(order)]


def box_columns(det: Mapping | None) -> dict[str, float | None]:
    """The ``box_*`` columns of ``predictions.csv`` from a detection (None: no box)."""
    vals = [None] * 5 if det is None else [det[k] for k in (*COORDS, "score")]
    return dict(zip(BOX_COLUMNS, vals, strict=True))


def map_detection(row: Mapping) -> dict:
    """A model without a detection head: its heat-map box (the ``box_*`` columns) as its one
    detection, scored by the box's score."""
    return {"rank": 1, "score": row["box_score"],
            **{k: row[c] for k, c in zip(COORDS, BOX_COLUMNS, strict=False)}}


def shown_detections(row: Mapping, box_threshold: float = 0.0) -> list[dict]:
    """The boxes to draw or send for one prediction row: its ``detections`` with
    ``score >= box_threshold``, or none when the row's ``decision`` is not ``fractured``."""
    if row.get("decision") != FRACTURED:
        return []
    return [d for d in row.get("detections") or [] if d["score"] >= box_threshold]


def detection_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The ``detections.csv`` rows (:data:`DETECTION_COLUMNS`) of prediction rows, in order."""
    return [{"file": r["file"], **d} for r in rows for d in r.get("detections") or []]

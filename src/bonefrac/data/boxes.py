"""Fracture boxes beside a data set: ``boxes.csv`` (``path,x0,y0,x1,y1``; extra columns ignored).

Coordinates are fractions of the image's width and height (0..1, top-left origin), one row per
box; an image may have several. Images without a row have no box (non-fractured images, or a
data set that only labels some). Fractions survive the stretch resize unchanged, so a box in
the original image is the same box in the model's input.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from bonefrac import BonefracError

BOXES_NAME = "boxes.csv"
_COLUMNS = ("path", "x0", "y0", "x1", "y1")


class BoxFileError(BonefracError, ValueError):
    """A ``boxes.csv`` that cannot be used; the message names the file, the row and the reason."""


def read_boxes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{relative path: (k, 4) float32 [x0, y0, x1, y1] fractions}`` from a boxes.csv.

    Raises:
        BoxFileError: missing columns, a non-number, a coordinate outside [0, 1], or x1 < x0.
    """
    path = Path(path)
    out: dict[str, list[list[float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BoxFileError(f"{path}: missing column(s) {missing}; need {list(_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                b = [float(row[c]) for c in _COLUMNS[1:]]
            except (TypeError, ValueError):
                raise BoxFileError(f"{path}:{line}: coordinates must be numbers") from None
            if not all(0.0 <= v <= 1.0 for v in b) or b[2] < b[0] or b[3] < b[1]:
                raise BoxFileError(f"{path}:{line}: need 0 <= x0 <= x1 <= 1 and "
                                   f"0 <= y0 <= y1 <= 1 (fractions), got {b}")
            out.setdefault(row["path"], []).append(b)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def dataset_boxes(root: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The boxes of the data set at ``root`` (its ``boxes.csv``), or None when it has none."""
    p = Path(root) / BOXES_NAME
    return read_boxes(p) if p.is_file() else None


def box_classes(root: str | os.PathLike) -> dict[str, str]:
    """{image: the class name of its first box} from ``root/boxes.csv``'s optional
    ``class_name`` column (the body region in bone-fracture); {} without either."""
    p = Path(root) / BOXES_NAME
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        out: dict[str, str] = {}
        for r in csv.DictReader(f):
            out.setdefault(r["path"], r.get("class_name") or "")
    return out


def cell_targets(boxes: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """Per-cell fracture targets ``(N, gh, gw)`` float32: 1 where a cell overlaps a box.

    ``boxes[i]``: ``(k, 4)`` fractions of image i (``k = 0``: all-zero target). Each box is
    grown to at least one cell so that a thin fracture line still marks the cell it lies in.
    """
    gh, gw = grid
    out = np.zeros((len(boxes), gh, gw), np.float32)
    for i, bs in enumerate(boxes):
        for x0, y0, x1, y1 in np.asarray(bs, np.float64).reshape(-1, 4):
            c0, c1 = _cells(x0, x1, gw)
            r0, r1 = _cells(y0, y1, gh)
            out[i, r0:r1, c0:c1] = 1.0
    return out


def _cells(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Cells ``[a, b)`` of an ``n``-cell axis that the span ``[lo, hi]`` (fractions) touches."""
    a = int(np.clip(np.floor(lo * n), 0, n - 1))
    b = int(np.clip(np.ceil(hi * n), a + 1, n))
    return a, b

"""Decoding the detection head's raw output into scored boxes, in numpy (no torch).

The head (:mod:`bonefrac.models.detect`) emits ``(N, L, 6)``: per location of each level
``[cls_logit, ctr_logit, l, t, r, b]`` with distances in input pixels. A location's centre is
``(col + 0.5) * stride, (row + 0.5) * stride`` on a ``ceil(size / stride)`` grid (what stride-2
convolutions with padding give). Score = sqrt(sigmoid(cls) * sigmoid(ctr)) (FCOS's ranking
score, on the probability scale). Boxes are returned as fractions of the input square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Low enough that AP and FROC see the whole ranking; what is *shown* uses the model's box
# threshold (bonefrac.inference.detections.shown_detections).
SCORE_MIN = 0.05
PRE_NMS = 200
NMS_IOU = 0.5
MAX_DETECTIONS = 10


@dataclass(frozen=True)
class DecodeConfig:
    """How to turn raw outputs into boxes; stored in the member's ``detector`` entry."""

    size: int
    strides: tuple[int, ...] = (8, 16, 32)
    score_min: float = SCORE_MIN
    pre_nms: int = PRE_NMS
    nms_iou: float = NMS_IOU
    max_detections: int = MAX_DETECTIONS

    @classmethod
    def from_spec(cls, detector: dict, size: int) -> DecodeConfig:
        keys = ("score_min", "pre_nms", "nms_iou", "max_detections")
        return cls(size, tuple(detector.get("strides", (8, 16, 32))),
                   **{k: detector[k] for k in keys if k in detector})


def location_centres(size: int, strides: tuple[int, ...]) -> np.ndarray:
    """``(L, 3)`` float32: x, y (input pixels) and stride of every location, in output order."""
    out = []
    for s in strides:
        n = math.ceil(size / s)
        ys, xs = np.meshgrid((np.arange(n) + 0.5) * s, (np.arange(n) + 0.5) * s, indexing="ij")
        out.append(np.stack([xs.ravel(), ys.ravel(), np.full(n * n, s)], axis=1))
    return np.concatenate(out).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def raw_boxes(raw: np.ndarray, size: int, strides: tuple[int, ...]
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(N, L, 6)`` raw -> (boxes ``(N, L, 4)`` x0, y0, x1, y1 in input pixels, scores
    ``(N, L)``)."""
    pts = location_centres(size, strides)
    if raw.shape[1] != len(pts):
        raise ValueError(f"detector output has {raw.shape[1]} locations; a {size}-pixel input "
                         f"at strides {strides} has {len(pts)}")
    x, y = pts[None, :, 0], pts[None, :, 1]
    boxes = np.stack([x - raw[..., 2], y - raw[..., 3], x + raw[..., 4], y + raw[..., 5]], -1)
    scores = np.sqrt(_sigmoid(raw[..., 0]) * _sigmoid(raw[..., 1]))
    return np.clip(boxes, 0, size), scores


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(K, 4)`` and ``(M, 4)`` x0, y0, x1, y1 boxes: ``(K, M)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(z: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(z[:, 2:] - z[:, :2], 0, None), axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first (torchvision's ``nms``
    rule: a box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou``)."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i, order = order[0], order[1:]
        keep.append(i)
        if len(order):
            order = order[box_iou(boxes[i:i + 1], boxes[order])[0] <= iou]
    return np.asarray(keep, np.int64)


def decode(raw: np.ndarray, cfg: DecodeConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: (boxes ``(K, 4)`` as fractions of the input square, scores ``(K,)``), best
    first, at most ``cfg.max_detections``, each scoring at least ``cfg.score_min``."""
    boxes, scores = raw_boxes(np.asarray(raw, np.float32), cfg.size, cfg.strides)
    out = []
    for b, s in zip(boxes, scores, strict=True):
        cand = np.flatnonzero(s >= cfg.score_min)
        cand = cand[np.argsort(-s[cand], kind="stable")[:cfg.pre_nms]]
        keep = cand[nms(b[cand], s[cand], cfg.nms_iou)][:cfg.max_detections]
        out.append((b[keep] / np.float32(cfg.size), s[keep]))
    return out

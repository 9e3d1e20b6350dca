"""The detection head's training targets and loss (FCOS: Tian et al., 2019).

A location is positive for a box when it lies inside the box (grown to at least the finest
stride, so that a thin fracture line still owns a location) and within ``RADIUS`` strides of its
centre ("centre sampling"), and the box's size suits the location's level (its largest distance
to a side is inside the level's range); a location claimed by several boxes takes the smallest.
Loss = focal loss over every location + centre-ness-weighted GIoU loss of the positives' boxes
+ BCE of their centre-ness, each normalised by the batch's positives. torchvision.ops supplies
the focal and GIoU losses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from bonefrac.inference.detect import location_centres

RADIUS = 1.5
# Per level: the range of a positive's largest distance to a box side, in input pixels
# (FCOS's 0-64-128-inf, for strides 8/16/32).
RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, float("inf")))


def fcos_targets(points: torch.Tensor, boxes: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of one image: (positive ``(L,)`` bool, box ``(L, 4)`` pixels, centre-ness ``(L,)``).

    ``points``: ``(L, 3)`` x, y, stride (:func:`location_centres`); ``boxes``: ``(K, 4)``
    x0, y0, x1, y1 in input pixels (K may be 0).
    """
    n = len(points)
    if not len(boxes):
        return (torch.zeros(n, dtype=torch.bool), torch.zeros(n, 4), torch.zeros(n))
    x, y, s = points[:, 0:1], points[:, 1:2], points[:, 2:3]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = ((boxes[:, 2] - boxes[:, 0]) / 2).clamp(min=float(points[:, 2].min()) / 2)
    half_h = ((boxes[:, 3] - boxes[:, 1]) / 2).clamp(min=float(points[:, 2].min()) / 2)
    inside = ((x - cx).abs() < half_w) & ((y - cy).abs() < half_h)  # (L, K), grown boxes
    central = ((x - cx).abs() < RADIUS * s) & ((y - cy).abs() < RADIUS * s)
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)
    reach = ltrb.amax(-1)  # (L, K)
    lo, hi = _ranges(points)
    fits = (reach >= lo) & (reach <= hi)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1)
    area = torch.where(inside & central & fits, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(dim=1)
    pos = torch.isfinite(best_area)
    d = ltrb[torch.arange(n), best].clamp(min=1e-3)
    ctr = torch.sqrt((torch.minimum(d[:, 0], d[:, 2]) / torch.maximum(d[:, 0], d[:, 2]))
                     * (torch.minimum(d[:, 1], d[:, 3]) / torch.maximum(d[:, 1], d[:, 3])))
    return pos, boxes[best], ctr * pos


def _ranges(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, 1)`` lower and upper reach of each location's level (levels in stride order)."""
    strides = sorted({float(v) for v in points[:, 2]})
    lo = torch.empty(len(points), 1)
    hi = torch.empty(len(points), 1)
    for k, st in enumerate(strides):
        m = points[:, 2] == st
        lo[m], hi[m] = RANGES[min(k, len(RANGES) - 1)]
    return lo, hi


class DetectionLoss:
    """``weight`` x the FCOS loss of a batch against the epoch's view's boxes.

    ``boxes[view][i]``: ``(k, 4)`` boxes of training image i in that view, as fractions of the
    input square (k = 0: no fracture, every location negative).
    """

    def __init__(self, boxes: list[list[np.ndarray]], size: int, strides: tuple[int, ...],
                 weight: float, device: torch.device):
        self.boxes, self.size, self.weight, self.device = boxes, size, weight, device
        self.points = torch.from_numpy(location_centres(size, strides))

    def targets(self, epoch: int, rows: np.ndarray):
        view = self.boxes[(epoch - 1) % len(self.boxes)]
        per = [fcos_targets(self.points, torch.as_tensor(view[i], dtype=torch.float32)
                            .reshape(-1, 4) * self.size) for i in rows]
        return [torch.stack(t).to(self.device) for t in zip(*per, strict=True)]

    def __call__(self, raw: torch.Tensor, epoch: int, rows: np.ndarray) -> torch.Tensor:
        """``raw``: ``(n, L, 6)`` head output for training images ``rows`` of the batch."""
        pos, gt, ctr_t = self.targets(epoch, rows)
        n_pos = pos.sum().clamp(min=1).float()
        cls = sigmoid_focal_loss(raw[..., 0], pos.float(), reduction="sum") / n_pos
        if not pos.any():
            return self.weight * cls
        pts = self.points.to(raw.device)[None].expand(len(raw), -1, -1)[pos]
        d = raw[pos][:, 2:]
        pred = torch.stack([pts[:, 0] - d[:, 0], pts[:, 1] - d[:, 1],
                            pts[:, 0] + d[:, 2], pts[:, 1] + d[:, 3]], -1)
        w = ctr_t[pos]
        giou = (generalized_box_iou_loss(pred, gt[pos], reduction="none") * w).sum() \
            / w.sum().clamp(min=1e-6)
        ctr = F.binary_cross_entropy_with_logits(raw[pos][:, 1], w, reduction="sum") / n_pos
        return self.weight * (cls + giou + ctr)

"""Detection metrics over images: AP (VOC all-point and COCO's, via pycocotools) and FROC.

Inputs, everywhere: ``dets[i]`` = (boxes ``(K, 4)``, scores ``(K,)``) of image i and ``gts[i]``
= its annotated boxes ``(M, 4)`` (M = 0 on a normal image), all x0, y0, x1, y1 in one frame per
image (fractions of the image; IoU does not depend on the frame's axis scales). One counting
kernel, :func:`image_matches`, decides true and false positives for AP and FROC alike: detections in
descending score order, each true when its best-overlapping, still unmatched annotated box has
IoU >= ``iou`` (the PASCAL VOC rule).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from bonefrac import InputError
from bonefrac.inference.detect import box_iou

FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)  # false positives per image

Dets = Sequence[tuple[np.ndarray, np.ndarray]]


def image_matches(dets: Dets, gts: Sequence[np.ndarray], iou: float = 0.5
                  ) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per image: (scores ``(K,)`` descending, true-positive flags ``(K,)``, number of
    annotated boxes). Greedy in score order: a detection is true when its best-overlapping
    still unmatched annotated box has IoU >= ``iou`` (PASCAL VOC's and COCO's rule)."""
    if len(dets) != len(gts):
        raise InputError(f"{len(dets)} images of detections but {len(gts)} of boxes")
    out = []
    for (boxes, sc), gt in zip(dets, gts, strict=True):
        boxes, sc = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(sc, np.float64)
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        order = np.argsort(-sc, kind="stable")
        ious = box_iou(boxes[order], gt)
        taken = np.zeros(len(gt), bool)
        hit = np.zeros(len(order), bool)
        for k in range(len(order)):
            cand = np.where(taken, -1.0, ious[k])
            j = int(np.argmax(cand)) if len(gt) else -1
            if j >= 0 and cand[j] >= iou:
                taken[j] = hit[k] = True
        out.append((sc[order], hit, len(gt)))
    return out


def pooled(matches: Sequence[tuple[np.ndarray, np.ndarray, int]]
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """All images' detections in descending score order: (scores, true flags, boxes)."""
    if not matches:
        return np.zeros(0), np.zeros(0, bool), 0
    s = np.concatenate([m[0] for m in matches])
    h = np.concatenate([m[1] for m in matches])
    order = np.argsort(-s, kind="stable")
    return s[order], h[order], int(sum(m[2] for m in matches))


def ap_from(tp: np.ndarray, n_gt: int, points: int | None = None) -> float:
    """AP of detections in descending score order with true flags ``tp``: the area under the
    precision-recall curve made monotone from the right (VOC all-point), or, with ``points``,
    its mean over that many evenly spaced recall levels 0..1 (COCO: 101)."""
    if n_gt == 0:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
    if points is not None:
        levels = np.linspace(0, 1, points)
        idx = np.searchsorted(recall, levels, side="left")
        return float(np.mean(np.where(idx < len(tp), envelope[np.minimum(idx, len(tp) - 1)]
                                      if len(tp) else 0.0, 0.0)))
    r = np.concatenate([[0.0], recall])
    return float(np.sum((r[1:] - r[:-1]) * envelope))


def average_precision(dets: Dets, gts: Sequence[np.ndarray], iou: float = 0.5) -> float:
    """AP at IoU >= ``iou``, PASCAL VOC all-point interpolation (VOC 2010 on); 0 without
    annotated boxes."""
    _, tp, n_gt = pooled(image_matches(dets, gts, iou))
    return ap_from(tp, n_gt)


def froc_from(tp: np.ndarray, n_gt: int, n_images: int,
              rates: Sequence[float] = FROC_RATES) -> dict[float, float]:
    """Box-level sensitivity at each rate of false positives per image: the most boxes found
    at a score cut whose false positives per image do not exceed the rate."""
    fp_per_image = np.cumsum(~tp) / max(n_images, 1)
    sens = np.cumsum(tp) / max(n_gt, 1)
    return {float(r): float(sens[fp_per_image <= r].max()) if (fp_per_image <= r).any()
            else 0.0 for r in rates}


def froc(dets: Dets, gts: Sequence[np.ndarray], rates: Sequence[float] = FROC_RATES,
         iou: float = 0.5) -> dict[float, float]:
    """:func:`froc_from` of ``dets`` against ``gts``."""
    _, tp, n_gt = pooled(image_matches(dets, gts, iou))
    return froc_from(tp, n_gt, len(gts), rates)


def bootstrap_detection(matches: Sequence[tuple[np.ndarray, np.ndarray, int]],
                        n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
                        ) -> dict[str, tuple[float, float]]:
    """Percentile CIs over images (resampled with replacement) of AP@0.5 and each FROC rate;
    the per-image matches are fixed, so a resample only pools them again."""
    rng = np.random.default_rng(seed)
    stats: dict[str, list[float]] = {}
    for _ in range(n_boot):
        sample = [matches[i] for i in rng.choice(len(matches), len(matches))]
        _, tp, n_gt = pooled(sample)
        vals = {"ap50": ap_from(tp, n_gt), **{f"froc_{r:g}": v for r, v in
                                              froc_from(tp, n_gt, len(sample)).items()}}
        for k, v in vals.items():
            stats.setdefault(k, []).append(v)
    return {k: tuple(float(q) for q in np.quantile(v, [alpha / 2, 1 - alpha / 2]))
            for k, v in stats.items()}


def coco_ap(dets: Dets, gts: Sequence[np.ndarray]) -> dict[str, float]:
    """COCO's AP@[.5:.95], AP@0.5 and AP@0.75 (101-point interpolation) from pycocotools,
    one category, boxes scaled to a 1000-pixel frame (COCO's area ranges are unused)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    scale = 1000.0
    images = [{"id": i + 1, "width": scale, "height": scale} for i in range(len(gts))]
    anns, results = [], []
    for i, (g, (b, s)) in enumerate(zip(gts, dets, strict=True)):
        for box in np.asarray(g, np.float64).reshape(-1, 4) * scale:
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, sc in zip(np.asarray(b, np.float64).reshape(-1, 4) * scale, s, strict=True):
            results.append({"image_id": i + 1, "category_id": 1, "score": float(sc),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, 0, 0, -1]  # (iou, recall) at area "all", 100 dets
    ap = lambda p: float(np.mean(p[p > -1])) if (p > -1).any() else 0.0  # noqa: E731
    return {"ap": ap(prec), "ap50": ap(prec[0]), "ap75": ap(prec[5])}


def choose_box_threshold(dets: Dets, gts: Sequence[np.ndarray], iou: float = 0.5
                         ) -> tuple[float, str]:
    """(the score cut with the highest box-level F1 at IoU >= ``iou`` on these images - the
    VALIDATION split's -, how it was chosen). Without detections or boxes: 0 (show all)."""
    s, tp, n_gt = pooled(image_matches(dets, gts, iou))
    if not len(s) or n_gt == 0:
        return 0.0, "no detections or no boxes on validation: every detection is shown"
    ctp = np.cumsum(tp)
    precision, recall = ctp / np.arange(1, len(tp) + 1), ctp / n_gt
    f1 = np.where(ctp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    k = int(np.argmax(f1))
    return float(s[k]), (f"highest box F1 at IoU >= {iou} on {len(gts)} validation images: "
                         f"{f1[k]:.3f} (precision {precision[k]:.3f}, recall {recall[k]:.3f})")


def detection_report(dets: Dets, gts: Sequence[np.ndarray], regions: Sequence[str] = (),
                     n_boot: int = 1000) -> dict:
    """Every detection number of the model card for one split: AP@0.5 (VOC all-point) with a
    bootstrap CI over images, COCO's AP@[.5:.95] / AP@0.75 (pycocotools), FROC with CIs and,
    given ``regions`` (per image: its boxes' class; "" for a normal image), AP@0.5 per region
    on that region's images plus every normal one."""
    matches = image_matches(dets, gts)
    _, tp, n_gt = pooled(matches)
    ci = bootstrap_detection(matches, n_boot)
    out = {"n_images": len(gts), "n_boxes": n_gt, "n_detections": int(len(tp)),
           "ap50": {"value": ap_from(tp, n_gt), "ci95": ci["ap50"],
                    "definition": "IoU >= 0.5, PASCAL VOC all-point interpolation"},
           "coco": coco_ap(dets, gts),
           "froc": {f"{r:g}": {"sensitivity": v, "ci95": ci[f"froc_{r:g}"]}
                    for r, v in froc_from(tp, n_gt, len(gts)).items()}}
    if regions:
        by: dict[str, list[int]] = {}
        for i, r in enumerate(regions):
            by.setdefault(r, []).append(i)
        normals = by.pop("", [])
        out["per_region"] = {
            r: {"n_images": len(idx), "n_boxes": int(sum(len(gts[i]) for i in idx)),
                "ap50": ap_from(*_tp_n(matches, idx + normals))}
            for r, idx in sorted(by.items())}
    return out


def _tp_n(matches, idx: Sequence[int]) -> tuple[np.ndarray, int]:
    _, tp, n_gt = pooled([matches[i] for i in idx])
    return tp, n_gt

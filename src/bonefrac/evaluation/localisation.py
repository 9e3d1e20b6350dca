"""Localisation metrics against fracture boxes, as pure numpy functions.

Units: every coordinate is a fraction of the image's width (x) or height (y), top-left origin,
so boxes ``[x0, y0, x1, y1]`` and points ``(x, y)`` live in ``[0, 1]^2`` whatever the image's
size (the model sees the image stretched to a square, so fractions carry over unchanged).
Ground truth per image is a ``(k, 4)`` array of boxes (:func:`bonefrac.data.boxes.dataset_boxes`);
only images with at least one box are scored (the caller keeps fractured images with boxes).

Three metrics, each over the scored images with a 95% percentile bootstrap CI over images
(:func:`bootstrap_mean_ci`: 2000 resamples, seed 0) and two baselines scored the same way:

- **Pointing game** (:func:`pointing_hits`): a hit when the map's peak lies inside some box
  grown by ``TOLERANCE`` = 15/224 on every side (15 px at the 224-px map). Centre baseline: the
  point (0.5, 0.5). Random baseline: a uniformly random point, whose expected hit rate is the
  area of the union of the grown boxes clipped to the image (:func:`union_area`, exact).
- **Box hit rate** (:func:`box_hits`): a hit when the predicted box has IoU >= 0.3 with some
  box. Baselines use one box size for all images, the median width and the median height of all
  ground-truth boxes of the scored set (:func:`baseline_box_size`): the centre baseline is that
  box centred at (0.5, 0.5); the random baseline is that box placed uniformly at random inside
  the image, its expected hit rate taken over a regular ``RANDOM_BOX_GRID`` x
  ``RANDOM_BOX_GRID`` grid of centres (deterministic, no seed; :func:`random_box_rate`).
- **Mass inside** (:func:`mass_inside`): the share of the non-negative map's mass, bilinearly
  upsampled to ``MASS_SIZE`` x ``MASS_SIZE``, that falls on pixels whose centre lies inside the
  union of the (ungrown) boxes; a map with no mass scores 0. Random baseline: a uniform map
  (= the boxes' area on that pixel grid); centre baseline: an isotropic Gaussian at (0.5, 0.5)
  with sigma ``CENTRE_SIGMA`` = 0.25 (fractions).

:func:`localisation_metrics` returns all of it JSON-ready, with the worst misses: the pointing
misses sorted by the peak's distance to the nearest box, farthest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bonefrac import InputError
from bonefrac.inference.detect import box_iou as pairwise_iou
from bonefrac.inference.localise import LOC_SIZE, upsample

TOLERANCE = 15 / 224  # pointing-game tolerance, fractions of width/height
IOU_THRESHOLD = 0.3
MASS_SIZE = LOC_SIZE  # the map resolution (px) at which mass is measured
CENTRE_SIGMA = 0.25  # the centre baseline map's Gaussian sigma, fractions
RANDOM_BOX_GRID = 64  # placements per axis of the random box baseline
N_BOOT = 2000

METRICS = ("pointing_game", "box_hit_rate", "mass_inside")


def as_boxes(boxes: np.ndarray | Sequence) -> np.ndarray:
    """Any box array-like -> ``(k, 4)`` float64 ``[x0, y0, x1, y1]`` (``k = 0`` allowed)."""
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def grow_boxes(boxes: np.ndarray, tol: float) -> np.ndarray:
    """Boxes ``(k, 4)`` grown by ``tol`` on every side and clipped to ``[0, 1]``."""
    b = as_boxes(boxes)
    return np.clip(b + np.array([-tol, -tol, tol, tol]), 0.0, 1.0)


def union_area(boxes: np.ndarray) -> float:
    """Exact area of the union of boxes ``(k, 4)`` clipped to ``[0, 1]^2`` (fraction of the
    image), by coordinate compression: the box edges cut the square into cells, each either
    inside some box or not."""
    b = np.clip(as_boxes(boxes), 0.0, 1.0)
    if len(b) == 0:
        return 0.0
    xs, ys = np.unique(b[:, [0, 2]]), np.unique(b[:, [1, 3]])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # cell centres
    in_x = (b[:, 0:1] <= cx) & (cx <= b[:, 2:3])  # (k, cells along x)
    in_y = (b[:, 1:2] <= cy) & (cy <= b[:, 3:4])  # (k, cells along y)
    inside = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)  # (cells y, cells x)
    return float((np.diff(ys)[:, None] * np.diff(xs)[None, :] * inside).sum())


def point_box_distance(points: np.ndarray, gt_boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Euclidean distance ``(N,)`` (fractions) from each point ``(N, 2)`` (x, y) to the nearest
    of its image's boxes; 0 inside a box, ``inf`` for an image without boxes."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    out = np.full(len(pts), np.inf)
    for i, (p, bs) in enumerate(zip(pts, gt_boxes, strict=True)):
        b = as_boxes(bs)
        if len(b):
            dx = np.maximum.reduce([b[:, 0] - p[0], np.zeros(len(b)), p[0] - b[:, 2]])
            dy = np.maximum.reduce([b[:, 1] - p[1], np.zeros(len(b)), p[1] - b[:, 3]])
            out[i] = float(np.hypot(dx, dy).min())
    return out


def pointing_hits(points: np.ndarray, gt_boxes: Sequence[np.ndarray], tol: float = TOLERANCE
                  ) -> np.ndarray:
    """``(N,)`` bool: point ``(x, y)`` of image i lies inside (edges included) some box of
    image i grown by ``tol`` on every side."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    hits = np.zeros(len(pts), bool)
    for i, (p, bs) in enumerate(zip(pts, gt_boxes, strict=True)):
        b = as_boxes(bs)
        hits[i] = bool(((b[:, 0] - tol <= p[0]) & (p[0] <= b[:, 2] + tol)
                        & (b[:, 1] - tol <= p[1]) & (p[1] <= b[:, 3] + tol)).any())
    return hits


def random_pointing_rate(gt_boxes: Sequence[np.ndarray], tol: float = TOLERANCE) -> np.ndarray:
    """``(N,)``: the probability that a uniformly random point hits image i's grown boxes,
    i.e. the area of their union clipped to the image."""
    return np.array([union_area(grow_boxes(b, tol)) for b in gt_boxes], np.float64)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU ``(k,)`` of one box ``(4,)`` with each of ``boxes`` ``(k, 4)``; 0 where the union
    has no area."""
    return pairwise_iou(np.asarray(box, np.float64).reshape(1, 4), as_boxes(boxes))[0]


def best_iou(pred_boxes: np.ndarray, gt_boxes: Sequence[np.ndarray]) -> np.ndarray:
    """``(N,)``: the highest IoU of predicted box i ``(N, 4)`` with any box of image i (0 if
    it has none)."""
    pred = as_boxes(pred_boxes)
    return np.array([float(box_iou(p, bs).max()) if len(as_boxes(bs)) else 0.0
                     for p, bs in zip(pred, gt_boxes, strict=True)], np.float64)


def box_hits(pred_boxes: np.ndarray, gt_boxes: Sequence[np.ndarray],
             thr: float = IOU_THRESHOLD) -> np.ndarray:
    """``(N,)`` bool: predicted box i has IoU >= ``thr`` with some box of image i."""
    return best_iou(pred_boxes, gt_boxes) >= thr


def baseline_box_size(gt_boxes: Sequence[np.ndarray]) -> tuple[float, float]:
    """(width, height): the medians over all ground-truth boxes of the scored set."""
    b = np.concatenate([as_boxes(x) for x in gt_boxes]) if gt_boxes else np.zeros((0, 4))
    if len(b) == 0:
        raise InputError("no ground-truth boxes")
    return float(np.median(b[:, 2] - b[:, 0])), float(np.median(b[:, 3] - b[:, 1]))


def centred_box(size: tuple[float, float]) -> np.ndarray:
    """``(4,)``: the box of ``size`` (w, h) centred at (0.5, 0.5)."""
    w, h = size
    return np.array([0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2], np.float64)


def random_box_placements(size: tuple[float, float], grid: int = RANDOM_BOX_GRID) -> np.ndarray:
    """``(grid * grid, 4)``: boxes of ``size`` whose centres form a regular grid over every
    position that keeps the box inside the image (uniform placement, evaluated exactly on the
    grid)."""
    w, h = size
    t = (np.arange(grid) + 0.5) / grid
    cx, cy = np.meshgrid(w / 2 + t * (1 - w), h / 2 + t * (1 - h))
    cx, cy = cx.ravel(), cy.ravel()
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def random_box_rate(gt_boxes: Sequence[np.ndarray], size: tuple[float, float],
                    thr: float = IOU_THRESHOLD, grid: int = RANDOM_BOX_GRID) -> np.ndarray:
    """``(N,)``: the fraction of uniformly placed boxes of ``size`` (:func:`random_box_placements`)
    with IoU >= ``thr`` against some box of image i."""
    cand = random_box_placements(size, grid)
    out = np.zeros(len(gt_boxes), np.float64)
    for i, bs in enumerate(gt_boxes):
        b = as_boxes(bs)
        if len(b):
            ious = np.stack([box_iou(g, cand) for g in b])  # (k, grid^2)
            out[i] = float((ious.max(axis=0) >= thr).mean())
    return out


def box_mask(boxes: np.ndarray, size: int = MASS_SIZE) -> np.ndarray:
    """``(size, size)`` bool: pixels whose centre ``((c + 0.5) / size, (r + 0.5) / size)`` lies
    inside (edges included) the union of ``boxes`` ``(k, 4)``."""
    c = (np.arange(size) + 0.5) / size
    mask = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in as_boxes(boxes):
        mask |= ((y0 <= c) & (c <= y1))[:, None] & ((x0 <= c) & (c <= x1))[None, :]
    return mask


def _mass_share(m: np.ndarray, mask: np.ndarray) -> float:
    total = float(m.sum())
    return float(m[mask].sum()) / total if total > 0 else 0.0


def mass_inside(maps: np.ndarray, gt_boxes: Sequence[np.ndarray], size: int = MASS_SIZE
                ) -> np.ndarray:
    """``(N,)`` in [0, 1]: the share of map i's mass inside image i's boxes.

    ``maps``: ``(N, h, w)``, any non-negative scale (negatives are clipped to 0), upsampled
    bilinearly to ``(size, size)`` (:func:`bonefrac.inference.localise.upsample`); a map with
    no mass scores 0.
    """
    out = np.zeros(len(maps), np.float64)
    for i, (mp, bs) in enumerate(zip(maps, gt_boxes, strict=True)):
        m = np.clip(upsample(np.asarray(mp, np.float32), size), 0.0, None).astype(np.float64)
        out[i] = _mass_share(m, box_mask(bs, size))
    return out


def gaussian_map(size: int = MASS_SIZE, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """``(size, size)``: isotropic Gaussian at the image centre, ``sigma`` in fractions, sampled
    at pixel centres (peak 1)."""
    c = (np.arange(size) + 0.5) / size - 0.5
    g = np.exp(-(c ** 2) / (2 * sigma ** 2))
    return np.outer(g, g)


def baseline_mass(gt_boxes: Sequence[np.ndarray], size: int = MASS_SIZE,
                  sigma: float = CENTRE_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(centre, random) ``(N,)`` each: mass inside image i's boxes of the centred Gaussian map
    and of a uniform map (= the share of pixels inside the boxes)."""
    g = gaussian_map(size, sigma)
    masks = [box_mask(b, size) for b in gt_boxes]
    return (np.array([_mass_share(g, mk) for mk in masks], np.float64),
            np.array([mk.mean() for mk in masks], np.float64))


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                      alpha: float = 0.05) -> np.ndarray:
    """Percentile bootstrap CI of the mean over images (rows).

    ``values``: ``(N,)`` or ``(N, m)`` per-image values; the columns (a metric and its
    baselines) are resampled with the same image indices (paired). Returns ``(2,)`` or
    ``(2, m)``: lower and upper bounds; NaN when N == 0.
    """
    v = np.asarray(values, np.float64)
    squeeze = v.ndim == 1
    v = v[:, None] if squeeze else v
    if len(v) == 0:
        out = np.full((2, v.shape[1]), math.nan)
    else:
        rng = np.random.default_rng(seed)
        means = np.empty((n_boot, v.shape[1]))
        for b in range(n_boot):
            means[b] = v[rng.choice(len(v), len(v))].mean(axis=0)
        out = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return out[:, 0] if squeeze else out


def worst_misses(points: np.ndarray, gt_boxes: Sequence[np.ndarray], n: int = 8,
                 tol: float = TOLERANCE) -> list[dict]:
    """Up to ``n`` pointing-game misses, farthest first: ``[{"index", "distance"}]``, the
    distance (fractions) from the peak to the nearest (ungrown) box; ties keep image order."""
    dist = point_box_distance(points, gt_boxes)
    miss = np.nonzero(~pointing_hits(points, gt_boxes, tol))[0]
    order = miss[np.argsort(-dist[miss], kind="stable")][:n]
    return [{"index": int(i), "distance": float(dist[i])} for i in order]


def _entry(vals: np.ndarray, ci: np.ndarray, definition: str, baselines: dict[str, str],
           **extra) -> dict:
    """One metric's JSON: column 0 of ``vals`` ``(N, 3)`` is the model, 1 centre, 2 random."""
    out = {"value": float(vals[:, 0].mean()), "ci95": [float(x) for x in ci[:, 0]], **extra,
           "n": len(vals), "definition": definition, "baselines": {}}
    for j, (name, how) in enumerate(baselines.items(), start=1):
        out["baselines"][name] = {"value": float(vals[:, j].mean()),
                                  "ci95": [float(x) for x in ci[:, j]], "definition": how}
    return out


def localisation_metrics(peaks: np.ndarray, boxes_pred: np.ndarray, maps: np.ndarray,
                         gt_boxes: Sequence[np.ndarray], *, n_boot: int = N_BOOT, seed: int = 0,
                         n_worst: int = 8) -> dict:
    """Pointing game, box hit rate and mass inside, with CIs and baselines (module docstring).

    Args:
        peaks: ``(N, 2)`` (x, y) fractions, the map's peak per image.
        boxes_pred: ``(N, 4)`` ``[x0, y0, x1, y1]`` fractions, the predicted box per image.
        maps: ``(N, h, w)`` non-negative heat maps in the image's (stretched) frame.
        gt_boxes: N arrays ``(k_i, 4)`` of fractions, ``k_i >= 1``.
    Returns: JSON-ready ``{"n_images", "n_boxes", "bootstrap", "pointing_game",
        "box_hit_rate", "mass_inside", "worst_misses", "per_image"}``; each metric is
        ``{"value", "ci95", "k"?, "n", "definition", "baselines": {"centre", "random"}}`` and
        ``per_image`` holds the per-image hits, IoUs, masses and peak distances.
    Raises:
        ValueError: no images, or an image without a box.
    """
    n = len(gt_boxes)
    if n == 0:
        raise InputError("localisation needs at least one image with a box")
    if any(len(as_boxes(b)) == 0 for b in gt_boxes):
        raise InputError("every scored image needs at least one box")
    peaks, boxes_pred = np.asarray(peaks, np.float64), np.asarray(boxes_pred, np.float64)
    centre = np.full((n, 2), 0.5)
    point = pointing_hits(peaks, gt_boxes)
    pg = np.stack([point, pointing_hits(centre, gt_boxes), random_pointing_rate(gt_boxes)], 1)
    size = baseline_box_size(gt_boxes)
    ious = best_iou(boxes_pred, gt_boxes)
    bh = np.stack([ious >= IOU_THRESHOLD, box_hits(np.tile(centred_box(size), (n, 1)), gt_boxes),
                   random_box_rate(gt_boxes, size)], 1)
    mass = mass_inside(maps, gt_boxes)
    ms = np.stack([mass, *baseline_mass(gt_boxes)], 1)
    vals = {"pointing_game": pg.astype(np.float64), "box_hit_rate": bh.astype(np.float64),
            "mass_inside": ms}
    ci = {k: bootstrap_mean_ci(v, n_boot, seed) for k, v in vals.items()}
    tol_px = round(TOLERANCE * MASS_SIZE)
    sz = f"{size[0]:.3f} x {size[1]:.3f}"
    return {
        "n_images": n, "n_boxes": int(sum(len(as_boxes(b)) for b in gt_boxes)),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": "95% percentile, over images"},
        "pointing_game": _entry(
            vals["pointing_game"], ci["pointing_game"],
            f"peak of the map inside a box grown by {tol_px}/{MASS_SIZE} of the image on every "
            "side", {"centre": "the point (0.5, 0.5)",
                     "random": "a uniform random point (expected rate: area of the grown boxes)"},
            k=int(point.sum()), tolerance=TOLERANCE),
        "box_hit_rate": _entry(
            vals["box_hit_rate"], ci["box_hit_rate"],
            f"predicted box with IoU >= {IOU_THRESHOLD} against some box",
            {"centre": f"a {sz} box (median GT width x height) centred at (0.5, 0.5)",
             "random": f"a {sz} box placed uniformly inside the image (expected rate, "
                       f"{RANDOM_BOX_GRID}x{RANDOM_BOX_GRID} grid of positions)"},
            k=int(bh[:, 0].sum()), iou_threshold=IOU_THRESHOLD, baseline_box_size=list(size)),
        "mass_inside": _entry(
            vals["mass_inside"], ci["mass_inside"],
            f"share of the map's mass ({MASS_SIZE}x{MASS_SIZE}, bilinear) inside the boxes",
            {"centre": f"an isotropic Gaussian at (0.5, 0.5), sigma {CENTRE_SIGMA}",
             "random": "a uniform map (= the boxes' area)"}),
        "worst_misses": worst_misses(peaks, gt_boxes, n_worst),
        "per_image": {"pointing_hit": [bool(x) for x in point],
                      "best_iou": [float(x) for x in ious],
                      "mass_inside": [float(x) for x in mass],
                      "peak_distance": [float(x) for x in point_box_distance(peaks, gt_boxes)]},
    }

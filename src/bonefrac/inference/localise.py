"""From a heat map to a point and a box (numpy + Pillow, no torch).

Maps are in the original image's frame stretched to a square (a letterbox model's maps are
brought there first, :func:`from_letterbox`), so fractions of the map's width/height are
fractions of the original image's width/height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from bonefrac.data.preprocess import letterbox_rect

# Resolution of the upsampled map in which the peak and the box are found: the pointing game's
# 15-px tolerance is stated at 224 px.
LOC_SIZE = 224
# The box is the connected region around the peak where the map is >= this fraction of the
# peak, found at this coarser resolution (the maps are 7-16 cells wide; finer adds no detail).
# Chosen on the validation split (v2 ensemble, 173 fractured images; levels 0.3-0.9 tried): mean
# best IoU with the fracture boxes 0.14 at 0.5 -> 0.22 at 0.8, box hit rate (IoU >= 0.3) 0.10 ->
# 0.31; 0.9 hits 0.32 but with a lower mean IoU (0.20).
BOX_LEVEL = 0.8
BOX_GRID = 56


@dataclass
class Localisation:
    """Per image: peak ``(N, 2)`` (x, y) and box ``(N, 4)`` (x0, y0, x1, y1), fractions of the
    image's width/height, and the box's score ``(N,)``."""

    peak: np.ndarray
    box: np.ndarray
    score: np.ndarray


def upsample(cam: np.ndarray, size: int | tuple[int, int] = LOC_SIZE) -> np.ndarray:
    """``(h, w)`` map -> ``(size, size)`` (or ``size = (H, W)``) float32, bilinear (pixel
    centres aligned). The one map resizer of prediction, evaluation and overlays."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    im = Image.fromarray(np.ascontiguousarray(cam, np.float32), mode="F")
    return np.asarray(im.resize(hw[::-1], Image.BILINEAR), np.float32)


def from_letterbox(cam: np.ndarray, aspect: np.ndarray) -> np.ndarray:
    """``(N, h, w)`` maps over letterboxed squares -> ``(N, h, w)`` maps over the images alone
    (the bars cropped, the image's part stretched back to the grid); ``aspect`` ``(N,)`` is
    each image's width/height."""
    n, h, w = cam.shape
    fine = (8 * h, 8 * w)  # crop at sub-cell precision
    out = np.empty_like(cam, dtype=np.float32)
    for i in range(n):
        x0, y0, x1, y1 = letterbox_rect(float(aspect[i]), 1.0)
        m = upsample(cam[i], fine)
        r0, c0 = int(y0 * fine[0]), int(x0 * fine[1])
        r1, c1 = max(r0 + 1, round(y1 * fine[0])), max(c0 + 1, round(x1 * fine[1]))
        out[i] = upsample(m[r0:r1, c0:c1], (h, w))
    return out


def _region(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 8-connected component of ``mask`` that contains ``seed`` (grown by dilation)."""
    reg = np.zeros_like(mask)
    reg[seed] = True
    while True:
        grown = reg.copy()
        grown[1:] |= reg[:-1]
        grown[:-1] |= reg[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:]
        grown &= mask
        if (grown == reg).all():
            return reg
        reg = grown


def localise(cam: np.ndarray, score: np.ndarray | None = None, size: int = LOC_SIZE
             ) -> Localisation:
    """Peak and box of each map in ``cam`` ``(N, h, w)`` (any non-negative scale).

    The peak is the argmax of the bilinearly upsampled map (pixel centre); the box is the
    bounding box of the connected region around it where the map is at least ``BOX_LEVEL`` of
    the peak. ``score`` (N,) is carried into the result; by default the map's peak value.
    """
    n = len(cam)
    peak = np.zeros((n, 2), np.float32)
    box = np.zeros((n, 4), np.float32)
    top = np.zeros(n, np.float32)
    for i in range(n):
        m = upsample(cam[i], size)
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        top[i] = m[r, c]
        peak[i] = ((c + 0.5) / size, (r + 0.5) / size)
        if top[i] <= 0:  # an empty map: the whole image, no better guess
            box[i] = (0, 0, 1, 1)
            continue
        g = upsample(cam[i], BOX_GRID)
        seed = (min(int(peak[i, 1] * BOX_GRID), BOX_GRID - 1),
                min(int(peak[i, 0] * BOX_GRID), BOX_GRID - 1))
        rows, cols = np.nonzero(_region(g >= BOX_LEVEL * g[seed], seed))
        box[i] = (cols.min() / BOX_GRID, rows.min() / BOX_GRID, (cols.max() + 1) / BOX_GRID,
                  (rows.max() + 1) / BOX_GRID)
    return Localisation(peak, box, top if score is None else np.asarray(score, np.float32))

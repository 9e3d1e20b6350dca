"""Training augmentation (torchvision transforms v2) on decoded uint8 grayscale images.

Fracture boxes, when given, go through the same random transform as their image
(``tv_tensors.BoundingBoxes``), and a draw that would push a box (mostly) out of the picture is
drawn again, so no augmented copy of a fractured image loses its fracture.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# A box must keep at least this fraction of its (transformed) area inside the image.
MIN_VISIBLE = 0.5
# Draws tried before falling back to the untransformed image.
MAX_TRIES = 10


def train_augmentation() -> v2.Compose:
    """Rotation +-20 deg, translation <= 10 %, zoom <= 10 %, horizontal flip."""
    return v2.Compose([
        v2.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0),
        v2.RandomHorizontalFlip(p=0.5),
    ])


def augment_batch(gray: np.ndarray, aug: v2.Compose) -> np.ndarray:
    """``(N, H, W)`` uint8 -> same shape, each image with its own random transform.

    Randomness comes from torch's global generator, which the trainer seeds per view.
    """
    t = torch.from_numpy(np.ascontiguousarray(gray))[:, None]
    return np.stack([aug(img)[0].numpy() for img in t])


def augment_with_boxes(gray: np.ndarray, boxes: list[np.ndarray], aug: v2.Compose
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Like :func:`augment_batch`, with each image's boxes moved along.

    Args:
        gray: ``(N, H, W)`` uint8.
        boxes: per image ``(k, 4)`` x0, y0, x1, y1 as fractions of width/height (k may be 0).
    Returns:
        The augmented images and their boxes (fractions, clipped to the image). An image whose
        draw leaves a box less than ``MIN_VISIBLE`` inside is drawn again (at most
        ``MAX_TRIES`` times, then kept as it is). Images without boxes consume exactly the
        random draws :func:`augment_batch` would, so their pixels are identical.
    """
    n, h, w = gray.shape
    scale = np.array([w, h, w, h], np.float32)
    out_img, out_box = np.empty_like(gray), []
    for i in range(n):
        img = torch.from_numpy(np.ascontiguousarray(gray[i]))[None]
        b = np.asarray(boxes[i], np.float32).reshape(-1, 4)
        if not len(b):
            out_img[i] = aug(img)[0].numpy()
            out_box.append(b)
            continue
        bb = tv_tensors.BoundingBoxes(torch.from_numpy(b * scale), format="XYXY",
                                      canvas_size=(h, w), clamping_mode=None)
        for _ in range(MAX_TRIES):
            im2, bb2 = aug(img, bb)
            moved = bb2.numpy().astype(np.float32)
            clipped = np.clip(moved, 0, scale)
            if (_area(clipped) >= MIN_VISIBLE * _area(moved)).all():
                out_img[i], b = im2[0].numpy(), clipped / scale
                break
        else:
            out_img[i] = gray[i]
        out_box.append(b)
    return out_img, out_box


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)

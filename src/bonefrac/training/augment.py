"""Training augmentation (torchvision transforms v2) on decoded uint8 grayscale images."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2


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

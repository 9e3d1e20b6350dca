"""Model-input preprocessing shared by training and ONNX prediction (numpy only, no torch).

A radiograph is decoded to ``(size, size)`` uint8 grayscale (:func:`bonefrac.data.io.load_gray`),
scaled to [0, 1], replicated to 3 channels and normalised with the backbone's own statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-ported EfficientNet-Lite weights expect inputs in [-1, 1].
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become a model input; stored with every trained model."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"decode": "grayscale, EXIF-oriented, bilinear resize", "scale": "[0,1]",
                **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` or ``(H, W)`` uint8 -> ``(N, 3, H, W)`` float32 normalised input."""
        g = np.asarray(gray)
        if g.ndim == 2:
            g = g[None]
        x = g.astype(np.float32)[:, None] / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        return (x - mean) / std

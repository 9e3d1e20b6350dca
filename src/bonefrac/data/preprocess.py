"""Model-input preprocessing shared by training and ONNX prediction (numpy only, no torch).

A radiograph is decoded to ``(size, size)`` uint8 grayscale (:func:`bonefrac.data.io.load_gray`),
scaled to [0, 1], replicated to 3 channels and normalised with the backbone's own statistics.

Two ways to make the square: ``stretch`` (each side resized to ``size``: the seed's and v1/v2's)
and ``letterbox`` (aspect kept, the longest side ``size``, centred on black). Heat maps, peaks and
boxes are always reported in the original image's frame; :func:`letterbox_rect` says where the
image lies in a letterboxed square.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bonefrac import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-ported EfficientNet-Lite weights expect inputs in [-1, 1].
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)
RESIZE_MODES = ("stretch", "letterbox")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become a model input; stored with every trained model.

    No field has a default: the geometry (``size`` in pixels, ``resize`` one of
    ``RESIZE_MODES``) always comes from the model (its spec, or the network being built), so
    a caller that forgets it gets an error, not a silently wrong square.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str  # one of RESIZE_MODES

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise InputError(f"size must be a positive integer, got {self.size!r}")

    def to_dict(self) -> dict:
        """The JSON form (``decode`` and ``scale`` describe the fields in words)."""
        return {"decode": f"grayscale, EXIF-oriented, bilinear {self.resize} resize",
                "scale": "[0,1]", **asdict(self), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of :meth:`to_dict`; every field is required (files written before
        ``resize`` existed are migrated by :func:`bonefrac.inference.spec.migrate`)."""
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   resize=d["resize"])

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        """``(N, H, W)`` or ``(H, W)`` uint8 -> ``(N, 3, H, W)`` float32 normalised input."""
        g = np.asarray(gray)
        if g.ndim == 2:
            g = g[None]
        x = g.astype(np.float32)[:, None] / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)[None, :, None, None]
        std = np.asarray(self.std, dtype=np.float32)[None, :, None, None]
        return (x - mean) / std


def require_resize(resize: str | None, sizes: object) -> str | None:
    """``resize`` itself, checked to be one of ``RESIZE_MODES`` wherever a model-input size is
    asked for (``sizes`` truthy: a size or a non-empty sequence of them). There is no default
    below the model's spec: a decode that forgets it is an error, not a stretched square."""
    if sizes and resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {RESIZE_MODES} to make a model input (the "
                         f"model's preprocessing says which), got {resize!r}")
    return resize


def letterbox_rect(w: int, h: int) -> tuple[float, float, float, float]:
    """Where a ``w`` x ``h`` image lies in its letterboxed square: ``(x0, y0, x1, y1)`` as
    fractions of the square's side (the longest side fills it, the other is centred)."""
    if w <= 0 or h <= 0:
        raise InputError(f"image size must be positive, got {w}x{h}")
    fw, fh = (1.0, h / w) if w >= h else (w / h, 1.0)
    return ((1 - fw) / 2, (1 - fh) / 2, (1 + fw) / 2, (1 + fh) / 2)


def boxes_to_letterbox(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """``(K, 4)`` boxes as fractions of a ``w`` x ``h`` image -> fractions of its letterbox."""
    x0, y0, x1, y1 = letterbox_rect(w, h)
    scale = np.array([x1 - x0, y1 - y0] * 2, np.float32)
    return np.asarray(boxes, np.float32) * scale + np.array([x0, y0] * 2, np.float32)


def boxes_from_letterbox(boxes: np.ndarray, aspect: float) -> np.ndarray:
    """The inverse of :func:`boxes_to_letterbox`: ``(K, 4)`` fractions of a letterboxed
    square -> fractions of the image (width/height ``aspect``), clipped to the image."""
    x0, y0, x1, y1 = letterbox_rect(float(aspect), 1.0)
    scale = np.array([x1 - x0, y1 - y0] * 2, np.float32)
    out = (np.asarray(boxes, np.float32) - np.array([x0, y0] * 2, np.float32)) / scale
    return np.clip(out, 0.0, 1.0)

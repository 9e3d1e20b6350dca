"""Grad-CAM overlay PNGs (Pillow + numpy; no matplotlib, no torch)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from bonefrac.utils import atomic_write


def _jet(v: np.ndarray) -> np.ndarray:
    """Map [0, 1] -> RGB uint8 with a jet-like colour ramp."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> Image.Image:
    """Grayscale ``(H, W)`` uint8 + CAM ``(h, w)`` in [0, 1] -> RGB overlay of size (W, H)."""
    h, w = gray.shape
    heat = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((w, h),
                                                                               Image.BILINEAR)
    colour = _jet(np.asarray(heat, np.float32) / 255)
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * colour).astype(np.uint8))


def heatmap_png(gray: np.ndarray, cam: np.ndarray) -> bytes:
    buf = io.BytesIO()
    overlay(gray, cam).save(buf, format="PNG")
    return buf.getvalue()


def save_overlay(gray: np.ndarray, cam: np.ndarray, out_dir: Path, source: Path,
                 prob: float) -> Path:
    """Write ``<stem>_<hash>_gradcam.png`` (hash of the full path keeps names unique)."""
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    path = Path(out_dir) / f"{source.stem}_{tag}_gradcam.png"
    with atomic_write(path, "wb") as f:
        f.write(heatmap_png(gray, cam))
    return path

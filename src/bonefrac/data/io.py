"""Decode one radiograph into a fixed-size grayscale array.

This is the single decoding path for training, evaluation, export checks and ONNX prediction,
so a model always sees pixels prepared exactly as in training. It imports no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A radiograph is at most a few tens of megapixels; anything bigger is refused, not decoded
# (Pillow's own bomb check would only warn below 2x its limit).
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageReadError(Exception):
    """A file that cannot be used as an image; ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Grayscale 'L' from any Pillow mode; 16-bit and float data are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black: transparent regions of an exported radiograph are background.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("L")


def decode_pil(im: Image.Image, size: int) -> np.ndarray:
    """Pillow image -> ``(size, size)`` uint8 grayscale (EXIF-oriented, bilinear, antialiased)."""
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"image is {im.width}x{im.height}, over the {MAX_PIXELS:,}-pixel cap")
    if im.format == "JPEG" and im.mode in ("L", "RGB", "CMYK", "YCbCr"):
        # Let libjpeg decode at a reduced scale (>= size): several times faster on big films.
        im.draft("L" if im.mode == "L" else "RGB", (size, size))
    im = ImageOps.exif_transpose(im)
    gray = _to_8bit_gray(im)
    if gray.width < 2 or gray.height < 2:
        raise ValueError(f"image is only {gray.width}x{gray.height} pixels")
    return np.asarray(gray.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_gray(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Read an image file and return it as a ``(size, size)`` uint8 array.

    Raises:
        ImageReadError: the file is missing, unreadable, not an image, truncated or too large.
    """
    p = Path(path)
    try:
        if p.suffix.lower() == ".dcm" or _is_dicom(p):
            from bonefrac.data.dicom import dicom_to_pil

            return decode_pil(dicom_to_pil(p), size)
        with Image.open(p) as im:
            return decode_pil(im, size)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(p, "file not found") from None
    except PermissionError:
        raise ImageReadError(p, "permission denied") from None
    except IsADirectoryError:
        raise ImageReadError(p, "is a directory") from None
    except UnidentifiedImageError:
        reason = "empty file (0 bytes)" if _size(p) == 0 else "not a recognised image format"
        raise ImageReadError(p, reason) from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(p, f"refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ImageReadError(p, f"cannot decode image ({e})") from None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return -1


def _is_dicom(p: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128, whatever their name."""
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False

"""Decode one radiograph into a fixed-size grayscale array.

This is the single decoding path for training, evaluation, export checks and ONNX prediction,
so a model always sees pixels prepared exactly as in training. It imports no torch.

Files are treated as hostile: the format is sniffed from the content (never the name), only
formats a radiograph arrives in are parsed, the pixel count is checked before any decoding,
and truncated files are refused rather than half-decoded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bonefrac import BonefracError, InputError

# The limits live below both decoders (this module and bonefrac.data.dicom), so the two do not
# import each other; they are re-exported here, where callers have always found them.
from bonefrac.data.limits import (
    DICOM_SUFFIXES,
    MAX_PIXELS,
    MIN_SIDE,
    ImageRefused,
    check_dimensions,
)
from bonefrac.data.preprocess import letterbox_rect, require_resize

__all__ = ["DICOM_SUFFIXES", "DISPLAY_MAX_SIDE", "FORMATS", "IMAGE_SUFFIXES", "MAX_PIXELS",
           "MIN_SIDE", "OUT_OF_MEMORY", "Decoded", "ImageReadError", "ImageRefused",
           "check_dimensions", "check_regular_file", "decode_pil", "failure_reason",
           "load_gray", "load_inputs", "open_formats"]

# Pillow raises its own DecompressionBombError above 2x MAX_PIXELS at open(); between 1x and 2x
# it only warns, and decode_pil refuses those from the header, so its warning would only be noise.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Formats hospital and research exports come in. Pillow's other plugins (TGA, ICO, PSD, ...)
# are never radiographs, widen the attack surface, and some (TGA) accept random bytes.
FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000", "PPM", "AVIF",
           "HEIF")
# What a folder scan (training folders, prediction folders, uploads) takes for an image: the
# suffixes of FORMATS and DICOM. Prediction also tries files without a suffix (DICOM exports).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                            ".jp2", ".j2k", ".pgm", ".ppm", ".avif", ".heic", ".heif",
                            *DICOM_SUFFIXES})
# Overlays are drawn at the original image's size, up to this many pixels on the longest side.
DISPLAY_MAX_SIDE = 2048
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
OUT_OF_MEMORY = "out of memory while decoding"


class ImageReadError(BonefracError):
    """A file that cannot be used as an image; ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Grayscale 'L' from any Pillow mode; 16-bit and float data are rescaled, not clipped."""
    if im.mode in _HIGH_BIT_MODES:
        # Min-max over finite values: a 16-bit export of an 8-bit image (x * 257) maps back
        # exactly, and NaN/inf in float TIFFs cannot poison the range.
        a = np.asarray(im).astype(np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            raise ImageRefused(f"{im.mode} image has no finite pixel values")
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black: transparent regions of an exported radiograph are background.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("L")


def decode_pil(im: Image.Image, size: int | None, resize: str | None = None) -> np.ndarray:
    """Pillow image -> ``(size, size)`` uint8 grayscale (EXIF-oriented, bilinear, antialiased).

    ``im`` may be lazily opened: its size is checked before any pixel is decoded.
    ``size=None``: the image's own aspect, longest side at most ``DISPLAY_MAX_SIDE``.
    ``resize``: ``stretch`` or ``letterbox`` (see :mod:`bonefrac.data.preprocess`), required
    with a ``size``.
    """
    require_resize(resize, size)
    check_dimensions(im.width, im.height)
    if size is None:
        scale = min(1.0, DISPLAY_MAX_SIDE / max(im.width, im.height))
        target = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    else:
        target = (size, size)
    if im.format == "JPEG" and im.mode in ("L", "RGB", "CMYK", "YCbCr"):
        # Let libjpeg decode at a reduced scale (>= size): several times faster on big films.
        im.draft("L" if im.mode == "L" else "RGB", target)
    im = ImageOps.exif_transpose(im)
    gray = _to_8bit_gray(im)
    if size is None:  # EXIF rotation may have swapped the sides
        scale = min(1.0, DISPLAY_MAX_SIDE / max(gray.width, gray.height))
        target = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        if target == gray.size:
            return np.asarray(gray, dtype=np.uint8)
    elif resize == "letterbox":
        return _letterbox(gray, size)
    return np.asarray(gray.resize(target, Image.BILINEAR), dtype=np.uint8)


def _letterbox(gray: Image.Image, size: int) -> np.ndarray:
    """'L' image -> ``(size, size)`` uint8: aspect kept, longest side ``size``, black bars."""
    x0, y0, x1, y1 = (round(v * size) for v in letterbox_rect(gray.width, gray.height))
    out = np.zeros((size, size), np.uint8)
    inner = gray.resize((max(1, x1 - x0), max(1, y1 - y0)), Image.BILINEAR)
    out[y0:y0 + inner.height, x0:x0 + inner.width] = np.asarray(inner, dtype=np.uint8)
    return out


def gray_from_array(image: np.ndarray, size: int | None = None, resize: str | None = None
                    ) -> np.ndarray:
    """An image already in memory -> ``(size, size)`` uint8, as :func:`load_gray` makes it from
    a file holding the same pixels (same Pillow resize).

    ``image``: ``(H, W)`` grayscale, uint8 (0..255) or float (0..1, scaled by 255 and rounded).

    Raises:
        ValueError: another shape or dtype, non-finite or out-of-range floats, an image too
            small or too large.
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise InputError(f"expected a (H, W) grayscale array, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError("a float image must hold finite values in [0, 1]")
        a = np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"expected a uint8 or float array, got {a.dtype}")
    try:
        return decode_pil(Image.fromarray(np.ascontiguousarray(a)), size, resize)
    except ImageRefused as e:
        raise InputError(str(e)) from None


@dataclass(frozen=True)
class Decoded:
    """One file decoded for prediction (what :func:`load_inputs` returns).

    - ``inputs``: ``{size: (size, size) uint8}``, one model input per requested size;
    - ``display``: ``(H, W)`` uint8 at the image's own aspect, longest side at most
      ``DISPLAY_MAX_SIDE`` (for overlays), or None when not asked for;
    - ``width``, ``height``: the image's size in pixels as it is displayed (EXIF rotation
      applied);
    - ``notes``: what a check run beside the decoder found ('' when nothing; see
      :meth:`bonefrac.data.isolation.DecodePool.decode`).
    """

    inputs: dict[int, np.ndarray]
    display: np.ndarray | None
    width: int
    height: int
    notes: str = ""


def load_gray(path: str | os.PathLike, size: int | None = None, resize: str | None = None
              ) -> np.ndarray:
    """Read an image or DICOM file and return it as a ``(size, size)`` uint8 array.

    ``size=None`` keeps the image's own size and aspect (for overlays), with the longest side
    capped at ``DISPLAY_MAX_SIDE``. ``resize``: ``stretch`` or ``letterbox``, required with a
    ``size`` (the model's preprocessing says which).

    The format comes from the content, so a PNG named ``.jpg`` or a DICOM file with no
    extension both work. This decodes in the calling process; files from outside go through
    :mod:`bonefrac.data.isolation`, which runs :func:`load_inputs` in a worker process.

    Raises:
        ImageReadError: the file is missing, unreadable, not an image, truncated, too large or
            too small; ``.reason`` is one line saying which.
    """
    if size is None:
        return load_inputs(path, (), display=True).display
    return load_inputs(path, (size,), resize=resize).inputs[size]


def load_inputs(path: str | os.PathLike, sizes: Sequence[int], display: bool = False,
                resize: str | None = None) -> Decoded:
    """Decode a file for every model input size (and the display image) at once: a
    :class:`Decoded` whose arrays equal ``load_gray(path, size, resize)`` for each size (and
    ``load_gray(path, None)`` with ``display``).

    Raises:
        ImageReadError: as :func:`load_gray`. Every failure of a decoder becomes one (any
            exception, and native ``BaseException`` subclasses such as pyo3's
            ``PanicException``); KeyboardInterrupt, SystemExit and GeneratorExit pass through.
    """
    require_resize(resize, sizes)  # a caller's mistake: raised as itself, not as a bad file
    p = Path(path)
    # Some libraries flip this global; a truncated radiograph must be refused, never padded.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    targets: list[int | None] = [*sizes, *([None] if display else [])]
    try:
        check_regular_file(p)
        arrays, (width, height) = _decode_targets(p, targets, resize)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except ImageReadError:
        raise
    except BaseException as e:  # a malformed file can trip any parser; never a traceback
        raise ImageReadError(p, failure_reason(e)) from None
    inputs = dict(zip(sizes, arrays[:len(sizes)], strict=True))
    return Decoded(inputs, arrays[-1] if display else None, width, height)


def _decode_targets(p: Path, targets: Sequence[int | None], resize: str | None
                    ) -> tuple[list[np.ndarray], tuple[int, int]]:
    """:func:`decode_pil` of the file for each target size, and the stored image's size.

    A JPEG is opened anew for each target (``draft`` fixes libjpeg's scale for the target);
    other formats are decoded once and every target is resized from the same pixels.
    """
    im = _open(p)
    try:
        out, (w, h) = [], im.size
        check_dimensions(w, h)  # before the EXIF read: Pillow loads a PNG's pixels for it
        size = (h, w) if _transposed(im) else (w, h)
        for i, target in enumerate(targets):
            if i and im.format == "JPEG":
                im.close()
                im = _open(p)
            out.append(decode_pil(im, target, resize))
        return out, size
    finally:
        im.close()


def _transposed(im: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height (orientations 5 to 8)."""
    return im.getexif().get(0x0112) in (5, 6, 7, 8)


def _open(p: Path) -> Image.Image:
    """A regular file as a Pillow image: lazily opened, or (DICOM) decoded to ``'L'``."""
    if _is_dicom(p):
        return _dicom_to_pil(p)
    try:
        return Image.open(p, formats=open_formats())
    except UnidentifiedImageError:
        if p.suffix.lower() in DICOM_SUFFIXES:  # DICOM without the 128-byte preamble
            return _dicom_to_pil(p)
        raise


def failure_reason(e: BaseException) -> str:
    """The one-line, per-file reason for whatever a decoder raised (never a traceback)."""
    if isinstance(e, ImageRefused | ImportError):  # ImportError: an optional decoder is missing
        return one_line(str(e))
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, UnidentifiedImageError):
        return ("not a recognised image format (supported: JPEG, PNG, TIFF, BMP, GIF, WebP, "
                "JPEG 2000, PNM, DICOM)")
    if isinstance(e, Image.DecompressionBombError):
        return one_line(f"image too large, not decoded ({e})")
    if isinstance(e, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(e, OSError):  # errno set: the file system said no; else Pillow: corrupt
        return one_line(f"cannot read file: {e.strerror}" if e.strerror
                        else f"cannot decode image: {e}")
    return one_line(f"cannot decode image ({type(e).__name__}: {e})")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_regular_file(p: Path) -> None:
    """Refuse, before opening, what is not a non-empty regular file (a FIFO would block)."""
    try:
        st = p.stat()  # follows symlinks
    except FileNotFoundError:
        if p.is_symlink():
            raise ImageRefused(f"broken symbolic link (target {os.readlink(p)} does not "
                               "exist)") from None
        raise
    if stat.S_ISDIR(st.st_mode):
        raise ImageRefused("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageRefused("not a regular file (device, FIFO or socket)")
    if st.st_size == 0:
        raise ImageRefused("empty file (0 bytes)")


@functools.cache
def open_formats() -> tuple[str, ...]:
    """The formats load_gray parses; imports only their Pillow plugins (Image.init() would
    import every plugin, ~35 ms of a cold start)."""
    for name in ("Bmp", "Gif", "Jpeg", "Jpeg2K", "Mpo", "Png", "Ppm", "Tiff", "WebP", "Avif"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"PIL.{name}ImagePlugin")
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _dicom_to_pil(p: Path) -> Image.Image:
    from bonefrac.data.dicom import dicom_to_pil  # pydicom is optional: import on demand

    return dicom_to_pil(p)


def _is_dicom(p: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128, whatever their name."""
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False

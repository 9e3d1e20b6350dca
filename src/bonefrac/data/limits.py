"""What every decoder refuses, shared by the image path (``io``) and the DICOM path (``dicom``).

They used to live in ``io``, which imports ``dicom`` to decode DICOM files: ``dicom`` importing
them back made the two modules a cycle. Both now import this module, which imports neither.
"""

from __future__ import annotations

from bonefrac import BonefracError

# A radiograph is at most a few tens of megapixels; anything bigger is refused, not decoded.
MAX_PIXELS = 64_000_000
# Smaller than any radiograph worth classifying (icons, placeholders, 1x1 tracking pixels).
MIN_SIDE = 16
DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageRefused(BonefracError, ValueError):
    """A readable image that is refused on purpose (too large, too small, not an image, ...).

    The message is the whole reason; :func:`bonefrac.data.io.load_gray` adds the file name.
    """


def check_dimensions(width: int, height: int) -> None:
    """Refuse, from the header alone, images too large to decode safely or too small to use."""
    if width * height > MAX_PIXELS:
        raise ImageRefused(f"image too large: {width}x{height} = {width * height:,} pixels, over "
                           f"the {MAX_PIXELS:,}-pixel cap (possible decompression bomb); "
                           "not decoded")
    if min(width, height) < MIN_SIDE:
        raise ImageRefused(f"image too small: {width}x{height} pixels (at least "
                           f"{MIN_SIDE}x{MIN_SIDE} needed)")

"""DICOM radiograph -> 8-bit grayscale, as a viewer would display it (needs ``bonefrac[dicom]``).

Pipeline (DICOM PS3.3 C.11, C.7.6.3): stored values (BitsStored, sign) -> Modality LUT or
Rescale Slope/Intercept -> VOI LUT or Window Center/Width when present, else the stored range
(BitsStored, through the rescale; see ``_effective_bits``) mapped onto 0..255, as an 8-bit
file's values are kept -> MONOCHROME1 inverted so bone is bright, as in MONOCHROME2.
Colour objects (RGB, YBR, PALETTE COLOR) become luma exactly as Pillow converts an RGB JPEG.
Only single-frame images are accepted; everything else is refused with a reason.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from bonefrac.data.limits import DICOM_SUFFIXES, ImageRefused, check_dimensions

__all__ = ["DICOM_SUFFIXES", "dicom_to_pil", "display_array"]

INSTALL_HINT = "pip install 'bonefrac[dicom]'"
# Where pydicom has no decoder installed for a compressed transfer syntax: what provides one.
# (pylibjpeg-libjpeg also decodes JPEG lossless / JPEG-LS but is GPL-3.0, so not suggested.)
_DECODERS = {
    "JPEG Lossless": "python-gdcm", "JPEG-LS": "python-gdcm", "JPEG Extended": "python-gdcm",
    "JPEG Baseline": "pillow", "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "RLE Lossless": "pylibjpeg pylibjpeg-rle",
}
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420",
           "PALETTE COLOR")


def dicom_to_pil(path: str | os.PathLike) -> Image.Image:
    """Read a single-frame DICOM image as a Pillow ``'L'`` image (8-bit, bone bright).

    Raises:
        ImportError: pydicom is not installed.
        ImageRefused: not an image object, multi-frame, unsupported or undecodable pixel data.
    """
    ds = _read(path)
    return Image.fromarray(display_array(_decode(ds), ds), mode="L")


def display_array(arr: np.ndarray, ds) -> np.ndarray:
    """Decoded pixel data ``(rows, cols)`` or ``(rows, cols, 3)`` -> ``(rows, cols)`` uint8."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _COLOUR:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)  # entries are 8- or 16-bit (PS3.3 C.7.6.3.1.5)
            arr = arr if arr.dtype == np.uint8 else np.round(arr / 257.0).astype(np.uint8)
        elif arr.dtype != np.uint8:  # BitsStored > 8 colour: scale the stored range to 8 bits
            full = 2 ** int(ds.BitsStored) - 1
            arr = np.round(np.clip(arr, 0, full) * (255.0 / full)).astype(np.uint8)
        return np.asarray(Image.fromarray(arr, mode="RGB").convert("L"))
    if arr.ndim != 2:
        raise ImageRefused(f"unexpected pixel array shape {arr.shape} for {photometric}")
    values, lo, hi = _grayscale_values(arr, ds)
    out = np.zeros(values.shape) if hi <= lo else np.clip((values - lo) / (hi - lo), 0, 1)
    if photometric == "MONOCHROME1":  # minimum value is white
        out = 1.0 - out
    return np.round(out * 255.0).astype(np.uint8)


def _grayscale_values(arr: np.ndarray, ds) -> tuple[np.ndarray, float, float]:
    """Apply the Modality and VOI transforms; return values and the range that maps to 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut

    rescaled = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    has_modality = "ModalityLUTSequence" in ds or rescaled != (1.0, 0.0)
    values = apply_modality_lut(arr, ds) if has_modality else arr
    if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
        values = values.astype(np.int64)  # VOI LUTs index by integer values
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        n, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        entries = apply_voi(np.arange(first, first + n), ds)
        # The LUT's own extremes, not its nominal bit depth: LUTs declared 16-bit often hold
        # 12-bit values, which would otherwise display almost black.
        return apply_voi_lut(values, ds), float(entries.min()), float(entries.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            return apply_voi_lut(values, ds), *_window_output_range(ds)
        except (ValueError, TypeError, IndexError):
            pass  # a broken window (width 0, non-numeric): display as if there were none
    # No window: the stored range, as for 8-bit data (display values already) and as the
    # writer meant it, so the same pixels give the same P however many bits hold them. A
    # percentile stretch changed P by up to 0.23 (evaluations/dicom_intensity.py).
    lo, hi = sorted(_window_output_range(ds, _effective_bits(arr, ds)))  # slope may be < 0
    return values, lo, hi


def _effective_bits(arr: np.ndarray, ds) -> int:
    """BitsStored, or fewer where unsigned data fill no more than its lowest BitsStored - 4
    bits: 12-bit values declared 16-bit (common) would otherwise display almost black."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) != 0 or arr.size == 0:
        return bits
    used = max(8, int(arr.max()).bit_length())
    return used if used <= bits - 4 else bits


def _window_output_range(ds, bits: int | None = None) -> tuple[float, float]:
    """The (y_min, y_max) that pydicom's ``apply_windowing`` maps a window onto (PS3.3
    C.11.2.1.2): the stored range of ``bits`` (default BitsStored), through the rescale when
    there is one."""
    bits = int(ds.BitsStored) if bits is None else bits
    if "ModalityLUTSequence" in ds:
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        y_min, y_max = 0.0, float(2**bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    return y_min, y_max


def _read(path: str | os.PathLike):
    """Parse the file and check, from the header only, that its pixels can be used."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ImportError(f"reading DICOM needs pydicom: {INSTALL_HINT}") from None
    forced = False
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:  # no preamble: old or raw files, accepted when they parse
        ds, forced = _forced_read(path), True
    except Exception as e:
        raise ImageRefused(f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if forced and "PixelData" not in ds:  # anything parses with force=True, even text
        raise ImageRefused("neither a recognised image format nor a DICOM file")
    if "PixelData" not in ds:
        what = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise ImageRefused(f"DICOM object has no pixel data ({what}): not an image")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageRefused(f"multi-frame DICOM ({frames} frames) is not supported; export "
                           "the view to classify as a single-frame image")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
               if k not in ds]
    if missing:
        raise ImageRefused(f"DICOM image lacks required attribute(s) {', '.join(missing)}")
    check_dimensions(int(ds.Columns), int(ds.Rows))  # before decoding: no bombs
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _MONO + _COLOUR:
        raise ImageRefused(f"photometric interpretation {photometric} is not supported")
    ds.setdefault("BitsStored", ds.BitsAllocated)
    ds.setdefault("PixelRepresentation", 0)
    ds.setdefault("SamplesPerPixel", 1 if photometric in _MONO else 3)
    _set_transfer_syntax(ds)
    return ds


def _forced_read(path: str | os.PathLike):
    """A file without the DICOM preamble, parsed as raw DICOM. What fails to parse is not
    known to be DICOM at all: text read this way claims absurd element lengths, and whether
    reading them fails as MemoryError depends on the decoder's memory cap and history."""
    import pydicom

    try:
        return pydicom.dcmread(path, force=True)
    except Exception:
        raise ImageRefused("neither a recognised image format nor a DICOM file") from None


def _set_transfer_syntax(ds) -> None:
    """Files without a File Meta header: the syntax is the encoding pydicom parsed them in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _decode(ds) -> np.ndarray:
    """Pixel data as an array (colour as RGB), or a reason why it cannot be decoded here."""
    from pydicom.pixels.decoders.base import get_decoder

    ts = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageRefused(f"transfer syntax {ts.name} ({ts}) is not supported: pydicom has no "
                           "decoder for it") from None
    if not decoder.is_available:
        pkg = next((v for k, v in _DECODERS.items() if str(ts.name).startswith(k)), None)
        hint = f"pip install {pkg}" if pkg else INSTALL_HINT
        raise ImageRefused(f"compressed transfer syntax {ts.name} ({ts}) needs a decoder "
                           f"({hint})")
    try:
        return ds.pixel_array
    except Exception as e:  # corrupt or truncated pixel data
        raise ImageRefused(f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
